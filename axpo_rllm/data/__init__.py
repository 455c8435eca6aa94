"""Layer 5 — real data in: dataset loaders, the paper's RL filtering, SFT export, rllm's evaluator.

``loaders``: the public formats (verl RL parquet, Hugging Face ``datasets`` with ``Image``
features, jsonl + an image folder, tsv) -> :class:`~axpo_rllm.data.loaders.DataRow` ->
:class:`~axpo_rllm.core.records.Task`; ``sources``: ``data_source`` -> verifier; ``writers``: verl
RL parquet, rllm dataset rows / registry, verl multi-turn SFT parquet; ``filtering``: drop what the
SFT model always solves and what the teacher never does; ``reward``: verl's ``compute_score`` for
converted files; ``rllm_evaluator``: the ``rllm.evaluators`` entry point. A sibling of ``train``
and ``integrations.rllm``: it imports neither (the CLI composes them).
"""
