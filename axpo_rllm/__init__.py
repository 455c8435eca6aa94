"""axpo-rllm: AXPO (Agent eXplorative Policy Optimization) for multimodal tool-using agents.

Layers, bottom to top (a module imports only its own layer or below; the import-linter contract
in ``setup.cfg`` checks it):

    1  core          records, AXPOConfig, planner (§1–§5), advantages (§6), diagnostics (§7), step
    1b configs       the shipped yaml and its loader
    2  engines       token-in/token-out engines, Qwen-VL vision helpers
    3  envs          env, tools, sandbox, verifiers, search server; rllm/verl tool adapters
    4  agents        chat format, parsing, agent, workflow
    5  integrations  verl (estimator, batch) · rllm (workflow, launcher)  |  train (actor, trainer, SFT, eval)
    6  demo          tiny model, synthetic world, teacher, main job, simulator
    7  cli           ``axpo-rllm``

Kept import-light: importing the package pulls nothing heavy.
"""

__version__ = "0.1.0"
