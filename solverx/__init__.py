"""SolverX: a local model daemon that serves a base model and its LoRA adapters, and keeps them learning."""

__version__ = "0.1.0"
