"""The selective training loss: the head on the counted positions only, the same loss and gradient as mlx-lm's."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gemma2, llama
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.loss import POSITION_BUCKET, find_head, loss_for, selective_loss, target_positions

VOCAB = 97


def small_llama(tied: bool) -> nn.Module:
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        rms_norm_eps=1e-5, vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip
    return llama.Model(args)


def small_gemma2() -> nn.Module:
    args = gemma2.ModelArgs(
        model_type="gemma2", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
        head_dim=8, rms_norm_eps=1e-6, vocab_size=VOCAB, num_key_value_heads=2, final_logit_softcapping=3.0,
    )  # fmt: skip
    return gemma2.Model(args)


def lora(model: nn.Module) -> nn.Module:
    mx.random.seed(0)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0})
    # LoRA's B starts at zero; give it values so the gradient of A is not zero too
    for _, module in model.named_modules():
        if hasattr(module, "lora_b"):
            module.lora_b = mx.random.normal(module.lora_b.shape) * 0.1
    return model


def a_batch() -> tuple[mx.array, mx.array]:
    tokens = mx.array(np.random.default_rng(0).integers(0, VOCAB, (3, 21)))
    lengths = mx.array([[5, 20], [1, 12], [9, 15]])  # prompt masked, then padding past each row's end
    return tokens, lengths


@pytest.mark.parametrize(
    "make", [lambda: small_llama(False), lambda: small_llama(True), small_gemma2], ids=["llama", "tied", "gemma2"]
)
def test_same_loss_and_gradient_as_mlx_lms_loss(make) -> None:
    model = lora(make())
    head = find_head(model)
    assert head is not None
    tokens, lengths = a_batch()
    positions, weights = target_positions(np.array(lengths), tokens.shape[1] - 1)
    (theirs, n_theirs), grad_theirs = nn.value_and_grad(model, default_loss)(model, tokens, lengths)
    args = (tokens, lengths, mx.array(positions), mx.array(weights))
    (ours, n_ours), grad_ours = nn.value_and_grad(model, selective_loss(head))(model, *args)
    assert n_ours.item() == n_theirs.item() == 16 + 12 + 7
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    theirs_flat, ours_flat = dict(tree_flatten(grad_theirs)), dict(tree_flatten(grad_ours))
    assert theirs_flat.keys() == ours_flat.keys() and theirs_flat
    for name, g in theirs_flat.items():
        assert mx.abs(g).max().item() > 0, name
        assert mx.allclose(ours_flat[name], g, rtol=1e-4, atol=1e-6).item(), name


def test_positions_are_padded_to_few_shapes_with_weight_zero() -> None:
    positions, weights = target_positions(np.array([[5, 20], [1, 12]]), 20)
    assert positions.shape == weights.shape == (POSITION_BUCKET,)
    assert weights.sum() == 16 + 12
    assert positions[:16].tolist() == list(range(4, 20))  # target index = step - 1
    assert positions[16:28].tolist() == list(range(20, 32))  # row 1 starts at 20 in the flat grid


class ScaledLogits(llama.Model):
    """A head this module does not know: the logits are scaled after the usual head."""

    def __call__(self, inputs, cache=None, input_embeddings=None):
        return 2 * super().__call__(inputs, cache, input_embeddings)


def test_an_unknown_head_trains_with_mlx_lms_own_loss() -> None:
    model = ScaledLogits(small_llama(False).args)
    assert find_head(model) is None

    def batches(*args, **kwargs):
        yield a_batch()

    loss, iterate = loss_for(model, batches)
    assert loss is default_loss and iterate is batches
    loss, iterate = loss_for(small_llama(False), batches)
    assert loss is not default_loss and len(next(iterate())) == 4
