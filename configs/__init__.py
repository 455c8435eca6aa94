"""Hydra/omegaconf yaml shipped as package data (``importlib.resources.files('axpo_rllm.configs')``)."""
