"""The generation engine, shared by the HTTP server and the trainer's evaluation (which import it, never each other).

``core`` (continuous batching: one forward pass per step for every running sequence) · ``sampling`` (temperature,
top-p, seeds per row) · ``lora`` (multi-LoRA layers and the adapter slots that hot-swap versions) · ``textstream``
(incremental detokenization). See docs/architecture.md.
"""
