"""Training one concept from a photo folder: data (`data`), checkpoints (`checkpoint`), the loop (`trainer`).

Import the API from `spectral_diffusion.training.trainer` (`TrainConfig`, `train`); this package imports nothing
eagerly, so light modules such as `band_registry` can use `training.checkpoint` without loading the trainer.
"""
