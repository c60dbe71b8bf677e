"""sisaflow: exact machine unlearning for generative language models (SISA training)."""

__version__ = "0.1.0"
