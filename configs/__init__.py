"""Layer 1b — configs: the shipped yaml (package data, ``importlib.resources.files('axpo_rllm.configs')``)
and ``loader``, which merges it (omegaconf) into the core's typed configs."""
