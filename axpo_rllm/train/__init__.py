"""Layer 5 — train: the CPU actor (``actor``), the RL trainer on verl's own estimator, losses and
KL (``trainer``), SFT (``sft``) and Pass@k evaluation (``evaluate``).

Framework-neutral except for verl's loss functions, reached through ``integrations.verl``.
"""
