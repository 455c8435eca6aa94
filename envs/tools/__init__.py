"""Tools of the environment; built-ins and third-party tools are found through the
``axpo_rllm.tools`` entry-point group."""
