"""axpo-rllm: AXPO (Agent eXplorative Policy Optimization) for multimodal tool-using agents.

Kept import-light: submodules pull numpy/torch/verl only when used.
"""

__version__ = "0.1.0"
