"""axpo_rllm.envs: the multimodal tool environment (tools, verifiers, env, framework adapters).

Shipped as ``axpo_rllm.envs`` (setuptools ``package_dir``); importing it stays light so that
``import axpo_rllm.envs`` works before the heavy stack is installed.
"""
