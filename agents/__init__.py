"""Layer 4 — agents (shipped as ``axpo_rllm.agents``): the chat format, turn parsing, the Qwen3-VL
agent and the AXPO workflow.

Shipped as ``axpo_rllm.agents`` (setuptools ``package_dir``); importing it stays light.
"""
