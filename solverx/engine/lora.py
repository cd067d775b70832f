"""Many LoRA adapters on one base model, chosen per sequence inside a single forward pass.

Every projection of the base is wrapped once in a :class:`MultiLoRALinear` that holds the A and B matrices of all
resident adapters stacked along a leading *slot* axis. Before a forward pass the engine sets one slot id per
sequence; the layer gathers each sequence's matrices with ``mx.gather_mm`` (the Punica/S-LoRA idea), so a batch
that mixes eight adapters costs about what a batch on one adapter costs. Slot 0 is reserved for
"no adapter" and is always zero, so the base model is served by the very same layers.

Loading an adapter writes its tensors into a free slot; nothing is reloaded and no other slot changes, so
sequences already running on other slots are unaffected (their output stays bit-identical).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from solverx.adapters.validate import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from solverx.engine.cpu_kernels import FastLinear

BASE_SLOT = 0
DEFAULT_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass
class SlotContext:
    """The per-forward routing shared by every wrapped layer: which slot each sequence in the batch uses."""

    ids: mx.array = field(default_factory=lambda: mx.array([BASE_SLOT], dtype=mx.uint32))
    slots: frozenset[int] = frozenset({BASE_SLOT})

    def set(self, slot_ids: list[int]) -> None:
        self.ids = mx.array(slot_ids, dtype=mx.uint32)
        self.slots = frozenset(slot_ids)


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out) features of a plain or quantized linear layer."""
    weight = layer.weight
    out_features, packed_in = weight.shape
    bits = getattr(layer, "bits", None)
    in_features = packed_in * 32 // bits if isinstance(layer, nn.QuantizedLinear) and bits else packed_in
    return in_features, out_features


class MultiLoRALinear(nn.Module):
    """A frozen base projection plus per-sequence LoRA deltas from a stack of resident adapters."""

    def __init__(self, base: nn.Module, context: SlotContext, capacity: int, rank: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_dims(base)
        self._context = context
        self._capacity = capacity
        self.lora_a_stack = mx.zeros((capacity, self.in_features, rank))
        self.lora_b_stack = mx.zeros((capacity, rank, self.out_features))
        self.scales = mx.zeros((capacity,))
        self._filled: set[int] = set()  # slots with a non-zero delta in this layer
        self.freeze()

    @property
    def rank(self) -> int:
        return self.lora_a_stack.shape[-1]

    def grow_rank(self, rank: int) -> None:
        """Zero-pad every slot to a larger rank; padded rows and columns contribute exactly nothing."""
        extra = rank - self.rank
        if extra > 0:
            self.lora_a_stack = mx.pad(self.lora_a_stack, [(0, 0), (0, 0), (0, extra)])
            self.lora_b_stack = mx.pad(self.lora_b_stack, [(0, 0), (0, extra), (0, 0)])

    def put(self, slot: int, lora_a: mx.array | None, lora_b: mx.array | None, scale: float) -> None:
        """Write one adapter's matrices into ``slot`` (``None`` clears the slot for this layer)."""
        if lora_a is None or lora_b is None:
            if slot in self._filled:
                self.lora_a_stack[slot] = 0.0
                self.lora_b_stack[slot] = 0.0
                self.scales[slot] = 0.0
                self._filled.discard(slot)
            return
        rank = lora_a.shape[1]
        self.grow_rank(rank)
        a = mx.zeros((self.in_features, self.rank))
        b = mx.zeros((self.rank, self.out_features))
        a[:, :rank] = lora_a.astype(mx.float32)
        b[:rank, :] = lora_b.astype(mx.float32)
        self.lora_a_stack[slot] = a
        self.lora_b_stack[slot] = b
        self.scales[slot] = scale
        self._filled.add(slot)

    def __call__(self, x: mx.array) -> mx.array:
        context = self._context
        if self._filled.isdisjoint(context.slots):
            return self.base(x)
        ids = context.ids
        if isinstance(self.base, FastLinear):  # decode-sized: the base product and the deltas in one kernel call
            y = self.base.with_lora(x, self.lora_a_stack, self.lora_b_stack, self.scales, ids)
            if y is not None:
                return y
        y = self.base(x)
        xa = mx.gather_mm(x.astype(mx.float32), self.lora_a_stack, rhs_indices=ids)
        delta = mx.gather_mm(xa, self.lora_b_stack, rhs_indices=ids)
        scale = self.scales[ids].reshape(-1, *([1] * (delta.ndim - 1)))
        return y + (scale * delta).astype(y.dtype)


def wrap_model(model: nn.Module, capacity: int, rank: int = 8, keys: Iterable[str] = DEFAULT_KEYS) -> SlotContext:
    """Wrap the named projections of every transformer layer once; returns the shared routing context."""
    context = SlotContext()
    keys = tuple(keys)
    for layer in model.layers:
        replacements = []
        for name, module in layer.named_modules():
            if name in keys and isinstance(module, nn.Linear | nn.QuantizedLinear):
                replacements.append((name, MultiLoRALinear(module, context, capacity, rank)))
        layer.update_modules(_nest(replacements))
    return context


def _nest(pairs: list[tuple[str, nn.Module]]) -> dict:
    tree: dict = {}
    for dotted, module in pairs:
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = module
    return tree


def lora_layers(model: nn.Module) -> dict[str, MultiLoRALinear]:
    """Wrapped layers by the module path adapter keys use, e.g. ``model.layers.0.self_attn.q_proj``."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MultiLoRALinear)}


class AdapterLoadError(ValueError):
    """An adapter's tensors do not fit the served base (wrong key or shape)."""


@dataclass
class _Resident:
    slot: int
    nbytes: int
    users: int = 0


class AdapterSlots:
    """Which adapter lives in which slot: loads on demand, keeps the most recently used, never evicts one in use.

    Bounded by slot count and by the bytes of resident adapter tensors. Keys are immutable version identities
    (``name@version``), so a new version always gets its own slot and running sequences keep the old one.
    """

    def __init__(self, model: nn.Module, capacity: int, max_bytes: int):
        self._layers = lora_layers(model)
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._resident: dict[str, _Resident] = {}  # insertion order = least recently used first

    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    @property
    def resident_bytes(self) -> int:
        return sum(r.nbytes for r in self._resident.values())

    def acquire(self, key: str, path) -> int | None:
        """The slot holding ``key``, loading it from ``path`` if needed; ``None`` when every slot is busy."""
        if key in self._resident:
            resident = self._resident.pop(key)
            self._resident[key] = resident  # most recently used
            resident.users += 1
            return resident.slot
        if not self._slot_obtainable():
            # Every slot is held by a running sequence. The engine retries on every decode step while this
            # sequence waits, so answer without reading the adapter's files (a large adapter would otherwise be
            # re-read from disk on each step, stalling every running sequence).
            return None
        tensors, scale = _read_adapter(path)
        nbytes = sum(t.nbytes for t in tensors.values())
        if nbytes > self._max_bytes:
            raise AdapterLoadError(f"adapter {key} needs {nbytes} bytes, over the {self._max_bytes}-byte budget")
        slot = self._free_slot(nbytes)
        if slot is None:
            return None
        self._write(slot, tensors, scale, key)
        self._resident[key] = _Resident(slot=slot, nbytes=nbytes, users=1)
        return slot

    def release(self, key: str) -> None:
        if key in self._resident:
            self._resident[key].users -= 1

    def _slot_obtainable(self) -> bool:
        """Whether a slot is free or can be freed by evicting an idle adapter (the byte budget aside)."""
        return len(self._resident) < self._capacity - 1 or any(r.users == 0 for r in self._resident.values())

    def _free_slot(self, nbytes: int) -> int | None:
        used = {r.slot for r in self._resident.values()}
        while True:
            free = [s for s in range(1, self._capacity) if s not in used]
            if free and self.resident_bytes + nbytes <= self._max_bytes:
                return free[0]
            idle = next((k for k, r in self._resident.items() if r.users == 0), None)
            if idle is None:
                return None
            used.discard(self._resident.pop(idle).slot)

    def _write(self, slot: int, tensors: dict[str, mx.array], scale: float, key: str) -> None:
        expected = {f"{path}.lora_a" for path in self._layers} | {f"{path}.lora_b" for path in self._layers}
        unknown = sorted(set(tensors) - expected)
        if unknown:
            raise AdapterLoadError(f"adapter {key} has tensors the base has no layer for: {unknown[:3]}")
        for path, layer in self._layers.items():
            a, b = tensors.get(f"{path}.lora_a"), tensors.get(f"{path}.lora_b")
            if (a is None) != (b is None):
                raise AdapterLoadError(f"adapter {key}: {path} has only one of lora_a / lora_b")
            if a is not None and (
                a.shape[0] != layer.in_features or b.shape[1] != layer.out_features or a.shape[1] != b.shape[0]
            ):
                raise AdapterLoadError(
                    f"adapter {key}: {path} has lora_a {a.shape} / lora_b {b.shape}, "
                    f"base layer is {layer.in_features}→{layer.out_features}"
                )
        for path, layer in self._layers.items():
            layer.put(slot, tensors.get(f"{path}.lora_a"), tensors.get(f"{path}.lora_b"), scale)
        mx.eval([(layer.lora_a_stack, layer.lora_b_stack, layer.scales) for layer in self._layers.values()])


def _read_adapter(path) -> tuple[dict[str, mx.array], float]:
    import json
    from pathlib import Path

    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = mx.load(str(path / ADAPTER_WEIGHTS))
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError(f"cannot read adapter at {path}: {exc}") from exc
    scale = float(config.get("lora_parameters", {}).get("scale", 20.0))
    return tensors, scale
