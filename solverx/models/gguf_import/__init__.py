"""Import a llama.cpp GGUF file as a base model the daemon can serve and train on: ``solverx prepare FILE.gguf``.

A GGUF holds everything a model directory does, in llama.cpp's spelling: hyperparameters and the tokenizer as
metadata (``llama.block_count``, ``tokenizer.ggml.tokens``…), tensors under llama.cpp's names (``blk.0.attn_q``)
in one of ggml's block formats. This module translates all three into what ``mlx_lm.load`` reads:

- **weights**, read through a memory map one tensor at a time (peak memory stays near one output shard).
  ``q_bits="keep"`` keeps the block formats MLX's affine quantization can represent exactly — Q4_0, Q4_1 and
  Q8_0 are affine with group 32 (``w = scale·q + bias``) — repacked bit for bit into MLX layers, the bits per
  layer written as per-module ``quantization`` overrides; every other format (K-quants, Q5_x, IQ…, F16, BF16) is
  dequantized with gguf-py to float32, the format MLX's CPU backend computes fastest. ``q_bits=None``
  dequantizes everything; ``q_bits=4|8`` dequantizes, then quantizes the way ``mlx_lm.convert`` does.
- **layout quirks of llama.cpp's converter**, undone or absorbed: for the ``llama`` architecture it permutes
  the q/k rows so that interleaved ("GPT-J") RoPE works — mlx-lm's ``rope_traditional`` is that RoPE, so the
  rows are kept and the flag set (the permutation cancels in q·k); for Gemma it stores RMSNorm weights as
  ``1 + w`` — mlx-lm's Gemma norms add the 1 themselves, so 1 is subtracted back.
- **the tokenizer**, rebuilt with ``tokenizers`` from the vocabulary: byte-level BPE (``gpt2``) from the tokens
  and merges, with the pre-tokenizer named by ``tokenizer.ggml.pre``; SentencePiece BPE (``llama``, also Gemma)
  with byte fallback, merges recovered from the scores as transformers' converters do.

The directory also records its source (``gguf-source.json``: path, architecture, size), so that an adapter trained
on it can be exported back to llama.cpp (:mod:`solverx.adapters.export`).

The output is written to a ``.partial`` sibling and renamed into place, as
:func:`solverx.models.prepare.prepare_checkpoint` does; the result is the same
:class:`~solverx.models.prepare.PreparedModel`.
"""

from solverx.models.gguf_import.convert import import_gguf
from solverx.models.gguf_import.metadata import (
    FAMILIES,
    GGUFImportError,
    GGUFSource,
    llama3_rope_scaling,
    read_gguf_summary,
)

__all__ = ["FAMILIES", "GGUFImportError", "GGUFSource", "import_gguf", "llama3_rope_scaling", "read_gguf_summary"]
