"""Training stage: Ray Train workers running DeepSpeed on reference-scored pairs.

``stage.train_stage`` (fit, then summary.json) · ``trainer`` (the TorchTrainer and its planned
steps) · ``worker`` (what each worker runs) · ``checkpoint`` (save, restore, export) · ``metrics``.
"""
