"""Layer 5 — integrations.verl: the ``axpo`` estimator in verl's registry (``estimator``) and the
step's training rows as a verl ``DataProto`` (``batch``). Both need verl."""
