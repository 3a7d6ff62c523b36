"""LoRA fine-tuning on mlx-lm models: demo model/data, data loading, LoRA, adapters, trainer.

Kept import-light: submodules are imported where used (``nestedfn.lm.demo``, ``.data``, ...).
"""
