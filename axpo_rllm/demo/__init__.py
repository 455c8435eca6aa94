"""Layer 6 — demo: the embedded CPU default. The tiny Qwen-VL built offline (``tiny_model``), the
synthetic world (``world``) and its programmatic teacher (``teacher``), the main job
(``main_job``) and the signal-yield simulator (``simulator``)."""
