"""Layer 3 — envs (shipped as ``axpo_rllm.envs``): the multimodal tool environment — tools,
sandbox, verifiers, search server, the env — and its rllm/verl tool adapters (``adapters``).

Shipped as ``axpo_rllm.envs`` (setuptools ``package_dir``); importing it stays light so that
``import axpo_rllm.envs`` works before the heavy stack is installed.
"""
