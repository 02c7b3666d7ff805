"""lifelong: a lifelong knowledge-editing manager for causal language models."""

__version__ = "0.1.0"
