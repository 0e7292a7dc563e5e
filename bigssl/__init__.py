"""bigssl: distributed self-supervised visual pretraining."""

__version__ = "0.1.0"
