"""Layer 3 — envs.adapters: the environment and its tools for other frameworks — rllm ``BaseEnv`` /
``Tool`` (``rllm``, importable without rllm) and verl ``BaseTool`` (``verl``, needs verl)."""
