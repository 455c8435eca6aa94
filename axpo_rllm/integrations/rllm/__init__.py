"""Layer 5 — integrations.rllm: the AXPO workflow as an rllm ``Workflow`` with its step coordinator,
grouping hook and estimator (``workflow``, needs rllm), and the GPU launcher (``launcher``)."""
