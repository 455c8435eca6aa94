"""Layer 1 — core: the records every layer speaks, the AXPO config, the planner (docs/algorithm.md §1–§5),
the advantages (§6), the diagnostics (§7) and the order of a step's phases.

numpy and torch only; nothing here knows an engine, a tool, rllm or verl. Read in this order:
``records`` → ``config`` → ``planner`` → ``advantages`` → ``diagnostics`` → ``step``.
"""
