"""LoRA adapters: the on-disk registry, validation, and the fingerprint that ties an adapter to its base."""
