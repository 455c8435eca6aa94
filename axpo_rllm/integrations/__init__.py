"""Layer 5 — integrations: thin adapters at the edge, one sub-package per framework.

- ``integrations.verl``: the ``axpo`` advantage estimator (verl's registry, entry point
  ``verl.plugins``) and the step's rows as a verl ``DataProto``;
- ``integrations.rllm``: the workflow as an rllm ``Workflow``, the grouping hook, the estimator in
  rllm's registry and the GPU launcher.

The algorithm never imports these; they import the layers below (core … agents). The CPU
trainer (``axpo_rllm.train``) uses ``integrations.verl``; ``integrations.rllm`` and ``train`` are
independent (the import contract in ``setup.cfg``).
"""
