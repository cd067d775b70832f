"""The generation engine: one base model, many adapters, continuous batching in one worker thread.

All MLX work happens on the engine's own thread (an MLX array must not cross threads unevaluated), so the
asyncio event loop is never blocked by generation. Requests enter through :meth:`Engine.generate`, an async
iterator of :class:`Delta`; each decode step advances every running sequence by one token in a single forward
pass, each sequence on its own adapter slot (see :mod:`solverx.engine.lora`). A sequence joins the batch as soon as its
prompt is prefilled and leaves it the moment it finishes or its client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from solverx.engine.cpu_kernels import SpeedUp, decode_attention, speed_up
from solverx.engine.grammar import GrammarMask, GrammarTokenizer, InvalidGrammar
from solverx.engine.lora import BASE_SLOT, AdapterLoadError, AdapterSlots, wrap_model
from solverx.engine.sampling import SamplingParams, process_logits, sample_rows
from solverx.engine.textstream import TextStream
from solverx.models.chat_rules import ChatRules
from solverx.models.prepare import context_limit  # also registers HyperCLOVA X

log = logging.getLogger("solverx.engine")

__all__ = [
    "AdapterRef",
    "ContextLengthExceeded",
    "Delta",
    "Engine",
    "EngineConfig",
    "EngineError",
    "SamplingParams",
]


class EngineError(Exception):
    """A request the engine cannot run; ``code`` and ``status`` say how to report it."""

    code = "engine_error"
    status = 500


class ContextLengthExceeded(EngineError):
    code = "context_length_exceeded"
    status = 400


class InvalidLogitBias(EngineError):
    code = "invalid_value"
    status = 400
    param = "logit_bias"


class InvalidResponseFormat(EngineError):
    code = "invalid_value"
    status = 400
    param = "response_format"


class AdapterUnusable(EngineError):
    code = "invalid_adapter"
    status = 400


class EngineStopped(EngineError):
    code = "engine_unavailable"
    status = 503
    retry_after: int | None = None


class EnginePaused(EngineStopped):
    """The base is unloaded while a training run needs its memory; clients should retry later."""

    code = "model_paused"

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class AdapterRef:
    """An immutable adapter version to generate with: ``key`` identifies it (``name@version``)."""

    key: str
    path: Path


@dataclass(frozen=True)
class Delta:
    """New text of one sequence; the last one has a ``finish_reason`` ("stop" or "length")."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 32
    prefill_chunk: int = 512
    # While other sequences are decoding, a prompt is prefilled at most this many tokens between two decode steps,
    # and fewer when a chunk would take longer than PREFILL_BUDGET decode steps: a long prompt then delays each
    # running stream's next token by a bounded amount instead of by its whole prefill. 0: chunks of
    # prefill_chunk, with no time budget.
    prefill_chunk_while_decoding: int = 256
    # Prompt (prefix) cache: the KV cache of recent prompts, per base and adapter version, so a request that
    # starts with a cached prompt (a chat's next turn) prefills only the rest. Bounded in bytes, LRU; 0: off.
    prompt_cache_bytes: int = 256 * 2**20
    prompt_cache_entries: int = 32
    max_resident_adapters: int = 8
    max_adapter_bytes: int = 512 * 2**20
    lora_rank: int = 8
    # On a CPU, decode-sized products of exactly 4-/8-bit weights (a GGUF import's) run our kernel
    # (solverx.engine.cpu_kernels): the same values, a fifth of the bytes read per token. False: float32 BLAS.
    cpu_kernels: bool = True
    # With cpu_kernels, also round x to int8 per 32 values in those products (AVX-512 VNNI, as llama.cpp's Q8_0
    # activations): bench/qmm.py's decode step at batch 8 1.26x faster here, none at batch 1, and greedy answers
    # leave the float32 model's after about a dozen tokens, so it is off unless asked for.
    int8_activations: bool = False


@dataclass
class EngineStats:
    """Counters the metrics endpoint reads; plain ints, updated by the worker thread."""

    running: int = 0
    waiting: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens the prompt cache spared the model
    prompt_cache_bytes: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    resident_adapter_bytes: int = 0  # published with resident_adapters by the worker thread, the slots' only writer


@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    adapter: AdapterRef | None
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: bool = False
    done: bool = False
    slot: int = BASE_SLOT
    key: mx.array | None = None
    stream: TextStream | None = None
    last_token: int = 0
    generated: int = 0
    cache: list | None = None  # its own KV cache while its prompt is being prefilled
    prefilled: int = 0  # prompt tokens through the model so far
    chunk: int = 0  # tokens of its next chunk while others decode (0: not sized yet)
    processors: list = field(default_factory=list)  # logit bias and penalties (SamplingParams.logits_processors)
    history: list[int] = field(default_factory=list)  # generated tokens, kept only for the processors
    grammar_mask: GrammarMask | None = None  # structured output: the tokens its grammar allows next
    started: float = field(default_factory=time.perf_counter)


PREFILL_BUDGET = 1.5  # a prefill chunk between two decode steps should take at most this many decode steps
FIRST_INTERLEAVED_CHUNK = 16  # then sized to the budget from the time each chunk took

_WAKE = object()
_STOP = object()


class Engine:
    """Serve one base model with per-sequence LoRA adapters. Start with :meth:`start`, stop with :meth:`stop`."""

    def __init__(self, model_dir: Path, base_id: str, config: EngineConfig | None = None):
        self.model_dir = Path(model_dir)
        self.base_id = base_id
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self.tokenizer = None
        self.context_length = 0
        self.vocab_size = 0
        self.model_type = ""
        self.chat_rules = ChatRules()
        self.speed_up = SpeedUp(0, 0, "not loaded yet")  # which projections run the fast CPU kernel
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._stopped = False
        self._paused: tuple[str, int] | None = None  # (why, retry-after seconds) while unloaded for training
        self._grammar_tokenizer: GrammarTokenizer | None = None  # llguidance's vocabulary, for structured outputs
        self._grammar_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Load the model on the engine thread and wait until it is ready (re-raises load errors)."""
        self._stopped = False
        self._ready.clear()
        self._load_error = None
        self._thread = threading.Thread(target=self._run, name="solverx-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and can take requests (``/health`` reports it)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.model = None  # let the weights go: a paused base must give its memory to training
        self.slots = None

    def pause(self, why: str, retry_after: int) -> None:
        """Unload the model so a training run can have its memory; requests get 503 with Retry-After meanwhile.

        Sequences already running are ended (they were told the engine stopped); the base stays listed.
        """
        self._paused = (why, retry_after)
        self.stop()

    def resume(self) -> None:
        """Load the model again after :meth:`pause`; requests are served as before."""
        self.start()
        self._paused = None

    @property
    def paused(self) -> bool:
        return self._paused is not None

    # -- prompts ---------------------------------------------------------------------------------------------

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Render messages with the base's chat template, ending where the assistant's answer begins (``tools``:
        OpenAI's tool list, for a template that renders tools itself: ``chat_rules.native_tools``)."""
        return self.chat_rules.encode(self.tokenizer, messages, add_generation_prompt=True, tools=tools)

    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    # -- generation ------------------------------------------------------------------------------------------

    async def generate(
        self, prompt_tokens: list[int], params: SamplingParams, adapter: AdapterRef | None = None
    ) -> AsyncIterator[Delta]:
        """Stream the completion of ``prompt_tokens``. Leaving the iteration early frees the batch slot."""
        if self._paused is not None:
            why, retry_after = self._paused
            raise EnginePaused(f"{self.base_id} is paused: {why}; retry in about {retry_after} s", retry_after)
        if self._stopped:
            raise EngineStopped("the engine is shutting down")
        if not prompt_tokens:
            raise ContextLengthExceeded("the prompt is empty")
        if len(prompt_tokens) >= self.context_length:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_tokens)} tokens; this model's context is {self.context_length} tokens"
            )
        unknown = [token for token, _ in params.logit_bias if not 0 <= token < self.vocab_size]
        if unknown:
            raise InvalidLogitBias(
                f"Invalid 'logit_bias': token id {unknown[0]} is not in {self.base_id}'s vocabulary "
                f"(ids 0 to {self.vocab_size - 1})"
            )
        seq = _Sequence(list(prompt_tokens), params, adapter, asyncio.get_running_loop(), asyncio.Queue())
        if params.grammar is not None:
            seq.grammar_mask = await asyncio.to_thread(self._grammar_mask, params.grammar)
        self._inbox.put(seq)
        try:
            while True:
                item = await seq.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not seq.done:
                seq.cancelled = True
                self._inbox.put(_WAKE)

    def _grammar_mask(self, grammar: str) -> GrammarMask:
        """A fresh mask for one sequence; the vocabulary's grammar view is built on the first (about a second)."""
        with self._grammar_lock:
            if self._grammar_tokenizer is None:
                hf = getattr(self.tokenizer, "_tokenizer", self.tokenizer)
                self._grammar_tokenizer = GrammarTokenizer(hf, set(self._eos), self.vocab_size)
        try:
            return self._grammar_tokenizer.mask(grammar)
        except InvalidGrammar as exc:
            raise InvalidResponseFormat(f"Invalid 'response_format': {exc}") from None

    # -- the worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # reported to start()'s caller
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: deque[_Sequence] = deque()  # holding a slot, their prompts going through in chunks
        self._active: list[_Sequence] = []
        self._cache: list[BatchKVCache] | None = None
        self._decode_seconds = 0.0  # a running average of one decode step's time
        self._prompt_cache = LRUPromptCache(self.config.prompt_cache_entries, self.config.prompt_cache_bytes)
        try:
            while self._admit_new():
                self._drop_cancelled()
                self._start_waiting()
                if self._prefilling:
                    self._prefill_chunk()
                if self._active:
                    self._decode_step()
                self.stats.running = len(self._active) + len(self._prefilling)
                self.stats.waiting = len(self._waiting)
        except BaseException as exc:  # never leave a client hanging
            log.exception("engine worker failed")
            for seq in [*self._active, *self._prefilling, *self._waiting]:
                self._fail(seq, EngineError(f"generation failed: {exc}"))
        finally:
            for seq in [*self._active, *self._prefilling, *self._waiting]:
                self._fail(seq, EngineStopped("the engine stopped"))
            self._drain_inbox()

    def _load(self) -> None:
        from mlx_lm import load

        model, tokenizer = load(str(self.model_dir))
        config = json.loads((self.model_dir / "config.json").read_text())
        self.model_type = config.get("model_type", "")
        self.chat_rules = ChatRules.for_model(config, tokenizer)
        self.context_length = context_limit(config)
        self.vocab_size = _vocab_size(config, tokenizer)
        self.speed_up = (
            speed_up(model, int8_activations=self.config.int8_activations)
            if self.config.cpu_kernels
            else SpeedUp(0, 0, "cpu_kernels is off")
        )
        log.info("%s: %s", self.base_id, self.speed_up.describe())
        self.slots_context = wrap_model(model, self.config.max_resident_adapters + 1, self.config.lora_rank)
        model.eval()
        mx.eval(model.parameters())
        self.model = model
        self.tokenizer = tokenizer
        self.slots = AdapterSlots(model, self.config.max_resident_adapters + 1, self.config.max_adapter_bytes)
        self._eos = set(tokenizer.eos_token_ids) | _control_token_ids(tokenizer)

    def _admit_new(self) -> bool:
        """Move submitted sequences into the waiting line; block while there is nothing to do. False = stop."""
        idle = not self._active and not self._waiting and not self._prefilling
        try:
            item = self._inbox.get() if idle else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if item is _STOP:
                return False
            if isinstance(item, _Sequence):
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _drop_cancelled(self) -> None:
        self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in self._prefilling if s.cancelled]:
            self._prefilling.remove(seq)
            self._release_slot(seq)
            seq.done, seq.cache = True, None
        if any(s.cancelled for s in self._active):
            self._retire([s for s in self._active if s.cancelled])

    def _start_waiting(self) -> None:
        """Start prefilling waiting sequences while the batch has room and their adapters have slots."""
        # Sequences whose adapter needs a slot while every slot is in use. They keep their place at the head of
        # the line (first to get a released slot, in order), but the base and adapters already resident do not
        # wait behind them: one adapter's queue must not stall requests that need no new slot.
        blocked: list[_Sequence] = []
        while self._waiting and len(self._active) + len(self._prefilling) < self.config.max_batch:
            seq = self._waiting.popleft()
            if blocked and seq.adapter is not None and seq.adapter.key not in self.slots.resident:
                blocked.append(seq)  # needs a slot too: stay behind the earlier ones
                continue
            try:
                slot = self._acquire_slot(seq)
            except EngineError as exc:
                self._fail(seq, exc)
                continue
            if slot is None:
                blocked.append(seq)  # every adapter slot is in use; wait for a sequence to finish
                continue
            seq.slot = slot
            self._begin_prefill(seq)
        self._waiting.extendleft(reversed(blocked))

    def _acquire_slot(self, seq: _Sequence) -> int | None:
        if seq.adapter is None:
            return BASE_SLOT
        try:
            slot = self.slots.acquire(seq.adapter.key, seq.adapter.path)
        except AdapterLoadError as exc:
            raise AdapterUnusable(str(exc)) from exc
        self.stats.resident_adapters = self.slots.resident
        self.stats.resident_adapter_bytes = self.slots.resident_bytes
        return slot

    def _release_slot(self, seq: _Sequence) -> None:
        if seq.adapter is not None:
            self.slots.release(seq.adapter.key)

    def _begin_prefill(self, seq: _Sequence) -> None:
        params = seq.params
        if not params.greedy:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            seq.key = mx.random.key(seed)
        seq.stream = TextStream(self.tokenizer.detokenizer, params.stop)
        seq.processors = params.logits_processors() + ([seq.grammar_mask] if seq.grammar_mask is not None else [])
        seq.cache, rest = None, seq.prompt
        if self.config.prompt_cache_bytes > 0:
            seq.cache, rest = self._prompt_cache.fetch_nearest_cache(_cache_key(seq.adapter), seq.prompt)
            if seq.cache is not None and not rest:  # the whole prompt is cached: rerun its last token for logits
                if can_trim_prompt_cache(seq.cache):
                    trim_prompt_cache(seq.cache, 1)
                    rest = seq.prompt[-1:]
                else:
                    seq.cache = None
        if seq.cache is None:
            seq.cache, rest = make_prompt_cache(self.model), seq.prompt
        seq.prefilled = len(seq.prompt) - len(rest)
        self.stats.cached_prompt_tokens += seq.prefilled
        self._prefilling.append(seq)

    def _prefill_chunk(self) -> None:
        """Run the next chunk of the oldest prefilling prompt through the model on its own cache; after the last
        chunk, sample its first token and let it join the decoding batch. The chunk is short while others decode
        (``prefill_chunk_while_decoding``), long when nothing else waits on it."""
        seq = self._prefilling[0]
        most = self.config.prefill_chunk_while_decoding
        interleaved = bool(self._active) and most > 0  # 0: prefill_chunk-sized chunks, whatever else decodes
        size = (seq.chunk or min(most, FIRST_INTERLEAVED_CHUNK)) if interleaved else self.config.prefill_chunk
        chunk = seq.prompt[seq.prefilled : seq.prefilled + max(1, size)]
        self.slots_context.set([seq.slot])
        started = time.perf_counter()
        logits = self.model(mx.array(chunk)[None], cache=seq.cache)
        mx.eval([c.state for c in seq.cache])
        seconds = time.perf_counter() - started
        seq.prefilled += len(chunk)
        if interleaved and self._decode_seconds > 0:  # size the next chunk to the budget (chunks get dearer)
            budget = PREFILL_BUDGET * self._decode_seconds
            seq.chunk = max(1, min(most, int(len(chunk) * budget / max(seconds, 1e-6))))
        if seq.prefilled < len(seq.prompt):
            return
        self._prefilling.popleft()
        cache, seq.cache = seq.cache, None
        self.stats.prompt_tokens += len(seq.prompt)
        if self.config.prompt_cache_bytes > 0:  # joining the batch copies it: the entry stays as it is now
            self._prompt_cache.insert_cache(_cache_key(seq.adapter), list(seq.prompt), _trimmed(cache))
            self.stats.prompt_cache_bytes = self._prompt_cache.nbytes
        logits = process_logits(logits[:, -1, :], [(seq.processors, seq.history)])
        tokens, keys = sample_rows(logits, [(seq.params, seq.key)])
        seq.key = keys[0]
        self._advance(seq, int(tokens.item()))
        if seq.done:
            self._release_slot(seq)
        else:
            self._join_batch([(seq, cache)])

    def _join_batch(self, joined: list[tuple[_Sequence, list]]) -> None:
        layers = len(joined[0][1])
        merged = [BatchKVCache.merge([cache[i] for _, cache in joined]) for i in range(layers)]
        if self._cache is None:
            self._cache = merged
        else:
            for mine, new in zip(self._cache, merged, strict=True):
                mine.extend(new)
        self._active.extend(seq for seq, _ in joined)

    def _decode_step(self) -> None:
        started = time.perf_counter()
        active = self._active
        self.slots_context.set([s.slot for s in active])
        inputs = mx.array([[s.last_token] for s in active])
        with decode_attention(self.speed_up):
            logits = self.model(inputs, cache=self._cache)[:, -1, :]
        logits = process_logits(logits, [(s.processors, s.history) for s in active])
        tokens, keys = sample_rows(logits, [(s.params, s.key) for s in active])
        mx.eval(tokens, keys)
        seconds = time.perf_counter() - started
        self._decode_seconds = seconds if not self._decode_seconds else 0.8 * self._decode_seconds + 0.2 * seconds
        self.stats.steps += 1
        for seq, token, key in zip(active, tokens.tolist(), keys, strict=True):
            seq.key = key
            if not seq.cancelled:
                self._advance(seq, token)
        finished = [s for s in active if s.done or s.cancelled]
        if finished:
            self._retire(finished)

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Account one sampled token: emit its text, or finish the sequence."""
        seq.generated += 1
        self.stats.completion_tokens += 1
        if seq.processors:
            seq.history.append(token)
        finish = None
        if token in self._eos and not seq.params.ignore_eos:
            finish = "stop"
            text = seq.stream.finish()
        else:
            text = seq.stream.push(token)
            seq.last_token = token
            if seq.stream.stopped:
                finish = "stop"
            elif seq.generated >= seq.params.max_tokens or len(seq.prompt) + seq.generated >= self.context_length:
                finish = "length"
                text += seq.stream.finish()
        if finish is not None:
            seq.done = True
        if text or finish is not None:
            self._emit(seq, Delta(text, finish, len(seq.prompt), seq.generated))

    def _retire(self, leaving: list[_Sequence]) -> None:
        gone = set(map(id, leaving))
        keep = [i for i, s in enumerate(self._active) if id(s) not in gone]
        for seq in leaving:
            self._release_slot(seq)
            seq.done = True
        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._cache = None
        elif self._cache is not None:
            indices = mx.array(keep)
            for layer_cache in self._cache:
                layer_cache.filter(indices)

    def _emit(self, seq: _Sequence, item: Delta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the client's event loop is already closed
            seq.loop.call_soon_threadsafe(seq.out.put_nowait, item)

    def _fail(self, seq: _Sequence, exc: BaseException) -> None:
        if not seq.done:
            seq.done = True
            self._emit(seq, exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Sequence):
                self._fail(item, EngineStopped("the engine stopped"))


# Chat-control tokens that end an answer in the templates we serve (ChatML, Gemma) even when the model's config
# names only one of them as EOS: generation must never print them as text.
_CONTROL_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<eos>")


def _cache_key(adapter: AdapterRef | None) -> str:
    """Whose prompt cache a sequence uses: the base's, or one adapter version's (its weights change every key
    and value, so a version never reuses another's)."""
    return "" if adapter is None else f"{adapter.key}\0{adapter.path}"


def _trimmed(cache: list) -> list:
    """``cache`` holding only its tokens: a KV cache grows in steps of 256 positions, so a 30-token prompt's entry
    would otherwise keep 256 positions of every layer alive (8× its size). Other kinds of cache are kept whole."""
    for layer in cache:
        if isinstance(layer, KVCache) and layer.keys is not None and layer.keys.shape[2] > layer.offset:
            layer.keys = mx.contiguous(layer.keys[..., : layer.offset, :])
            layer.values = mx.contiguous(layer.values[..., : layer.offset, :])
            mx.eval(layer.keys, layer.values)
    return cache


def _vocab_size(config: dict, tokenizer) -> int:
    """The rows of the model's output layer (a VLM keeps them in its text config), else the tokenizer's vocabulary."""
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else len(tokenizer.get_vocab())


def _control_token_ids(tokenizer) -> set[int]:
    vocab = tokenizer.get_vocab()
    return {vocab[token] for token in _CONTROL_TOKENS if token in vocab}
