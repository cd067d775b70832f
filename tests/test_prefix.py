"""Training from the kept hidden states of the frozen blocks: the same loss and gradient, each row computed once."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import gemma2, llama
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.loss import loss_for
from trainer.prefix import FrozenStates, find_split, first_trained_block

VOCAB = 97


def adapted(model: nn.Module, blocks: int) -> nn.Module:
    """``model`` with LoRA on its last ``blocks`` blocks, B non-zero so every LoRA weight has a gradient."""
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, blocks, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    return model


def small_llama(layers: int = 4) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=layers, intermediate_size=64, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    return llama.Model(args)


def batches_of(*batches):
    def iterate(*args, **kwargs):
        yield from batches

    return iterate


def a_batch(seed: int = 0) -> tuple[mx.array, mx.array]:
    tokens = np.random.default_rng(seed).integers(1, VOCAB, (3, 21))
    lengths = np.array([[5, 20], [1, 12], [9, 15]])  # prompt masked, then padding past each row's end
    for row, (_, end) in zip(tokens, lengths, strict=True):
        row[end:] = 0
    return mx.array(tokens), mx.array(lengths)


def test_lora_on_the_last_blocks_trains_from_kept_states_with_mlx_lms_loss_and_gradient() -> None:
    model = adapted(small_llama(4), blocks=2)
    assert first_trained_block(model) == 2
    loss, iterate = loss_for(model, batches_of(a_batch()))
    hidden, tokens, lengths, *_ = batch = next(iterate())
    assert hidden.shape == (3, 20, 32)
    (theirs, n_theirs), grad_theirs = nn.value_and_grad(model, default_loss)(model, tokens, lengths)
    (ours, n_ours), grad_ours = nn.value_and_grad(model, loss)(model, *batch)
    assert n_ours.item() == n_theirs.item() == 16 + 12 + 7
    assert abs(ours.item() - theirs.item()) < 1e-5 * abs(theirs.item())
    theirs_flat, ours_flat = dict(tree_flatten(grad_theirs)), dict(tree_flatten(grad_ours))
    assert theirs_flat.keys() == ours_flat.keys() and all(".layers.2." in k or ".layers.3." in k for k in ours_flat)
    for name, g in theirs_flat.items():
        assert mx.abs(g).max().item() > 0, name
        assert mx.allclose(ours_flat[name], g, rtol=1e-4, atol=1e-6).item(), name


def test_each_distinct_row_goes_through_the_frozen_blocks_once() -> None:
    model = adapted(small_llama(4), blocks=2)
    split = find_split(model)
    assert split is not None
    first, second = a_batch(0), a_batch(1)
    reordered = (first[0][::-1], first[1][::-1])  # the same rows in another batch and order
    states = FrozenStates(split.bottom)
    kept = [states.batch(*b) for b in (first, second, reordered, first)]
    assert states.computed == 6
    assert mx.array_equal(kept[0], kept[3]).item() and mx.array_equal(kept[2], kept[0][::-1]).item()
    whole = split.bottom(first[0][:, :-1])
    for row, (_, end) in enumerate(np.array(first[1])):  # the batch's own states where they count, zero past them
        assert mx.allclose(kept[0][row, :end], whole[row, :end], atol=1e-5).item()
        assert not kept[0][row, end:].any().item()
    unkept = FrozenStates(split.bottom, budget=0)  # over the budget: computed each time, the same states
    assert mx.array_equal(unkept.batch(*first), kept[0]).item()
    assert unkept.computed == 3 and not unkept.rows


def test_without_frozen_blocks_or_an_exact_split_the_step_runs_the_whole_model() -> None:
    every_block = adapted(small_llama(2), blocks=2)
    assert first_trained_block(every_block) == 0 and find_split(every_block) is None
    args = gemma2.ModelArgs(
        model_type="gemma2", hidden_size=32, num_hidden_layers=4, intermediate_size=64, num_attention_heads=4,
        head_dim=8, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2, final_logit_softcapping=3.0,
    )  # fmt: skip
    scaled_embedding = adapted(gemma2.Model(args), blocks=2)  # Gemma scales the embedding inside its decoder
    assert find_split(scaled_embedding) is None
    _, iterate = loss_for(scaled_embedding, batches_of(a_batch()))
    assert len(next(iterate())) == 4  # tokens, lengths, positions, weights: no kept states
