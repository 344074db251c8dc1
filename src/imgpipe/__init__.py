"""imgpipe: a reproducible image-classification pipeline (DVC + Hydra + MLflow + dvclive)."""

__version__ = "0.1.0"
