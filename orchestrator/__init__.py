"""Ray-based distributed QLoRA fine-tuning: Ray Data -> Ray Train -> Ray Tune -> merge -> Ray Serve."""

__version__ = "0.1.0"
