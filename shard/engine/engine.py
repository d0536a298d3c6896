"""The continuous-batching engine: one thread that, at every step, admits waiting requests,
prefills them (in chunks, batched), decodes every running request in one forward, and retires
finished ones. Rows of one forward may use different LoRA adapters (``LoraManager``); requests
whose adapter is not on a device slot yet wait without stalling the others."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from shard.engine.attention import use_decode_attention
from shard.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from shard.engine.errors import (
    EngineClosedError,
    InvalidRequestError,
    PromptTooLongError,
)
from shard.engine.kv_cache import SlotKVCache
from shard.engine.llama_forward import LlamaForward
from shard.engine.llama_forward import supports as llama_forward_supports
from shard.engine.prefix_cache import PrefixCache
from shard.engine.requests import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    RequestHandle,
    Usage,
)
from shard.engine.sampling import RowSampler, sample_batch
from shard.engine.scheduler import PrefillChunk, Scheduler

if TYPE_CHECKING:
    from shard.lora import AdapterKey, AdapterSelection, LoraLease, LoraManager
    from shard.lora.hot_policy import HotAdapterPolicy

log = logging.getLogger(__name__)

# The longest an idle engine lets a burst gather, in admission windows.
_BURST_WINDOWS = 10
# How long a request waits before asking the LoRA manager again about an adapter that is still
# loading, when no "ready" notification arrived.
_ADAPTER_RETRY_S = 0.05
_THROUGHPUT_WINDOW_S = 10.0
# How often the engine asks its hot-adapter policy whether to merge or unmerge.
_HOT_MERGE_CHECK_S = 1.0


@dataclass(frozen=True)
class EngineStats:
    running: int
    queued: int
    queue_capacity: int
    max_batch_size: int
    max_context: int
    requests_completed: int
    tokens_generated: int
    decode_tokens_per_s: float
    kv_used_tokens: int
    kv_capacity_tokens: int
    prefill_tokens_computed: int = 0  # prompt tokens run through the model (not taken from the prefix cache)
    # Prefix cache (zeros when it is off): prompt tokens looked up, and how many of them were
    # reused instead of computed; hit rate = hit / queried.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_blocks: int = 0
    prefix_cache_capacity_blocks: int = 0
    merged_adapter: AdapterKey | None = None  # merged into the base weights (LoraManager.merge)

    @property
    def prefix_cache_hit_rate(self) -> float:
        q = self.prefix_cache_queried_tokens
        return self.prefix_cache_hit_tokens / q if q else 0.0


class _Sequence:
    """One request inside the engine."""

    def __init__(self, request, handle, prompt_ids, max_tokens, sampler, detokenizer, stops) -> None:
        self.request = request
        self.handle = handle
        self.prompt_ids: list[int] = prompt_ids
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.stops = stops
        self.generated: list[int] = []
        self.unsent_text = ""  # released by the detokenizer and the stop matcher, not sent yet
        self.unsent_ids: list[int] = []
        self.unsent_logits: list[torch.Tensor] = []
        self.sent_first = False
        self.row: int | None = None
        self.prefilled = 0
        self.prefix_checked = False  # looked up in the prefix cache (once, before its first chunk)
        self.lora_lease: LoraLease | None = None  # the adapters it holds and its row's (slot, weight) entries
        self.done = False


class Engine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_context: int = 2048,
        default_max_tokens: int = 256,
        prefill_chunk_tokens: int = 512,
        lora: LoraManager | None = None,
        record_logits: bool = False,
        initial_kv_columns: int | None = 256,
        metrics=None,
        prefix_cache_bytes: int = 0,
        prefix_block_tokens: int = 16,
        decode_attention: bool = True,
        fused_forward: bool = True,
        admission_window_s: float = 0.0,
        hot_merge_policy: HotAdapterPolicy | None = None,
        warm_up: bool = True,
    ) -> None:
        """``decode_attention``: decode steps on CPU attend through the compiled kernel
        (shard.engine.attention) where it builds; False keeps the model's own attention.
        ``fused_forward``: Llama models run the engine's own forward with fused elementwise
        kernels (shard.engine.llama_forward); False, or any other model, runs the model's forward.
        ``admission_window_s``: when the engine is idle and requests arrive, it waits until none
        has arrived for this long (at most ``_BURST_WINDOWS`` windows, or until the rows are full)
        before the first prefill, so a burst is prefilled as one batch; 0 starts at once."""
        attention = str(getattr(model.config, "_attn_implementation", "") or "")
        if attention.startswith("flash") or "paged" in attention:
            # These kernels ignore a 4D mask; rows of different lengths would attend to garbage.
            raise ValueError(f"attention implementation {attention!r} is not supported; use sdpa or eager")
        self.model = model
        self.decode_attention = decode_attention and use_decode_attention(model)
        self._model_forward = LlamaForward(model) if fused_forward and llama_forward_supports(model) else model
        self.tokenizer = tokenizer
        self.max_context = self._context_limit(model, max_context)
        self.default_max_tokens = default_max_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.admission_window_s = admission_window_s
        self.warm_up = warm_up  # `start` runs one forward of a full batch first (`_warm_up`)
        self.lora = lora  # None: this engine serves the base model only
        self.record_logits = record_logits
        self.metrics = metrics  # shard.metrics.ShardMetrics, or None
        embeddings = model.get_input_embeddings().weight
        self.device = embeddings.device
        self.cache = SlotKVCache.for_model(
            model,
            max_batch=max_batch_size,
            max_context=self.max_context,
            dtype=embeddings.dtype,
            initial_context=initial_kv_columns,
            token_scatter=self._model_forward.fused_ops if isinstance(self._model_forward, LlamaForward) else None,
        )
        self.scheduler = Scheduler(max_batch=max_batch_size, max_queue=max_queue, rows=self.cache)
        self.prefix_cache = (
            PrefixCache.for_cache(self.cache, block_tokens=prefix_block_tokens, max_bytes=prefix_cache_bytes)
            if prefix_cache_bytes > 0
            else None
        )
        self.eos_ids = self._eos_ids(model, tokenizer)
        self._lock = threading.Condition()
        self._cancelled: list[_Sequence] = []
        self._adapter_retry_at: dict[AdapterSelection, float] = {}
        self._closed = False
        self._stop = False
        self._thread: threading.Thread | None = None
        self._completed = 0
        self._tokens = 0
        self._prefill_tokens = 0
        self._decode_window: deque[tuple[float, float, int]] = deque()  # (end time, seconds, tokens)
        # Merges and unmerges asked for from other threads, applied by the engine thread between
        # steps: (action, adapter, future answered with the adapter replaced / unmerged).
        self._merge_requests: deque[tuple[str, AdapterKey | None, Future]] = deque()
        self.hot_merge_policy = hot_merge_policy if lora is not None else None
        self._merged_by_admin = False  # an admin merge stays until an admin unmerge
        self._next_hot_check = 0.0
        if lora is not None:
            lora.add_listener(self._on_adapter_event)

    # --- set-up helpers ------------------------------------------------------------------------

    @staticmethod
    def _context_limit(model, requested: int) -> int:
        config = model.config
        limit = requested
        for name in ("max_position_embeddings", "sliding_window"):
            value = getattr(config, name, None)
            # The mask this engine builds is fully causal: never let a context outgrow a window.
            if isinstance(value, int) and value > 0 and (name != "sliding_window" or getattr(config, "use_sliding_window", True)):
                limit = min(limit, value)
        return limit

    @staticmethod
    def _eos_ids(model, tokenizer) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            value = getattr(source, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Start the engine's thread; returns once its warm-up forward has run (`_warm_up`)."""
        if self._thread is None:
            warmed = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(warmed,), name="loraplex-engine", daemon=True)
            self._thread.start()
            warmed.wait()
        return self

    def close(self) -> None:
        """Take no new requests; running and queued ones finish."""
        with self._lock:
            self._closed = True

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop; requests still in flight are cancelled."""
        with self._lock:
            self._closed = True
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def drain(self, timeout: float) -> bool:
        """Close; refuse the queued requests, then wait up to ``timeout`` s for the running ones to
        finish. A queued request has produced nothing yet, so its caller can still send it to
        another shard (the gateway does: `EngineClosedError` answers UNAVAILABLE); a running one may
        have streamed text already and can only complete here."""
        with self._lock:
            self._closed = True
            for sequence in list(self.scheduler.waiting):
                self._fail(sequence, EngineClosedError("the shard is shutting down; the request had not started"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.scheduler.running == 0 and not self.scheduler.waiting:
                    return True
            time.sleep(0.02)
        return False

    # --- submission ----------------------------------------------------------------------------

    def tokenize(self, request: GenerationRequest) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_ids)]
        if sum(given) != 1:
            raise InvalidRequestError("give exactly one of prompt, messages or prompt_ids")
        if request.prompt_ids is not None:
            ids = [int(t) for t in request.prompt_ids]
            vocab = self.model.get_input_embeddings().weight.shape[0]
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError("prompt_ids contains ids outside the vocabulary")
        elif request.messages is not None:
            if not request.messages:
                raise InvalidRequestError("messages is empty")
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequestError("the base model's tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template(
                list(request.messages), add_generation_prompt=True, tokenize=False
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        return ids

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request. Raises InvalidRequestError / PromptTooLongError / QueueFullError /
        EngineClosedError at once; adapter errors arrive through the handle's iteration."""
        options = request.sampling
        options.validate()
        if request.adapter is not None and self.lora is None:
            raise InvalidRequestError("this shard serves the base model only")
        prompt_ids = self.tokenize(request)
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_ids)} tokens; the context holds {self.max_context}"
            )
        max_tokens = min(options.max_tokens or self.default_max_tokens, room)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(request.request_id, len(prompt_ids), max_tokens, loop, self._cancel)
        sequence = _Sequence(
            request,
            handle,
            prompt_ids,
            max_tokens,
            RowSampler(options, self.device),
            IncrementalDetokenizer(self.tokenizer, prompt_ids),
            StopStringMatcher(options.stop),
        )
        handle._sequence = sequence
        with self._lock:
            if self._closed:
                raise EngineClosedError("the shard is shutting down")
            self.scheduler.enqueue(sequence)
            self._lock.notify_all()
        return handle

    def request_merge(self, key: AdapterKey) -> Future:
        """Merge `key` (on a device slot already: `LoraManager.load` it first) into the base weights
        between two steps. The future answers with the adapter it replaced (None: none), or raises
        MergeRefusedError. Running requests keep running; their answers do not change."""
        return self._queue_merge_change("merge", key)

    def request_unmerge(self) -> Future:
        """Restore the base weights between two steps; the future answers with the adapter that was
        merged (None: none)."""
        return self._queue_merge_change("unmerge", None)

    def _queue_merge_change(self, action: str, key: AdapterKey | None) -> Future:
        if self.lora is None:
            raise InvalidRequestError("this shard serves the base model only")
        future: Future = Future()
        with self._lock:
            if self._stop:
                raise EngineClosedError("the shard is shutting down")
            self._merge_requests.append((action, key, future))
            self._lock.notify_all()
        return future

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._cancelled.append(handle._sequence)
            self._lock.notify_all()

    def _on_adapter_event(self, key, error: Exception | None) -> None:
        with self._lock:
            self._adapter_retry_at.clear()
            self._lock.notify_all()

    # --- stats ---------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            now = time.monotonic()
            window = [w for w in self._decode_window if now - w[0] <= _THROUGHPUT_WINDOW_S]
            seconds = sum(w[1] for w in window)
            tokens = sum(w[2] for w in window)
            prefix = self.prefix_cache.stats() if self.prefix_cache is not None else None
            return EngineStats(
                running=self.scheduler.running,
                queued=len(self.scheduler.waiting),
                queue_capacity=self.scheduler.max_queue,
                max_batch_size=self.scheduler.max_batch,
                max_context=self.max_context,
                requests_completed=self._completed,
                tokens_generated=self._tokens,
                prefill_tokens_computed=self._prefill_tokens,
                decode_tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
                kv_used_tokens=sum(self.cache.lengths),
                kv_capacity_tokens=self.cache.max_batch * self.cache.max_context,
                prefix_cache_queried_tokens=prefix.queried_tokens if prefix else 0,
                prefix_cache_hit_tokens=prefix.hit_tokens if prefix else 0,
                prefix_cache_blocks=prefix.cached_blocks if prefix else 0,
                prefix_cache_capacity_blocks=prefix.capacity_blocks if prefix else 0,
                merged_adapter=self.lora.merged if self.lora is not None else None,
            )

    # --- the loop ------------------------------------------------------------------------------

    def _run(self, warmed: threading.Event) -> None:
        with torch.inference_mode():
            try:
                self._warm_up()
            except Exception:  # the engine still serves; its first batch pays the page faults
                log.exception("warm-up forward failed")
            finally:
                warmed.set()
            while True:
                with self._lock:
                    while not self._stop and not self._has_work():
                        self._lock.wait(timeout=_ADAPTER_RETRY_S if self.scheduler.waiting else None)
                    if self.admission_window_s > 0 and self.scheduler.running == 0:
                        self._gather_burst()
                    if self._stop:
                        break
                try:
                    self.run_once()
                except Exception:  # a step must never kill the loop; its requests were failed
                    log.exception("engine step failed")
            with self._lock:
                for sequence in list(self.scheduler.waiting) + self.scheduler.prefilling + self.scheduler.decoding:
                    if not sequence.done:
                        self._finish(sequence, FinishReason.CANCELLED)
                for _, _, future in self._merge_requests:
                    future.set_exception(EngineClosedError("the shard is shutting down"))
                self._merge_requests.clear()

    def _warm_up(self) -> None:
        """A prefill forward the size of a full chunk over every row, then a decode step, on the
        engine's thread before it serves; logits dropped, rows emptied, no statistics counted. The
        first batch would otherwise fault in its activations while its requests wait (bf16, 32
        prompts of 64 tokens over gRPC: ~34k page faults, first token 0.50 s against 0.32-0.36 s
        for the batches after); the memory stays with the process (shard.c_allocator)."""
        if not self.warm_up:
            return
        rows = list(range(self.scheduler.max_batch))
        # Within the columns already allocated: the warm-up must not grow the cache.
        width = max(1, min(self.prefill_chunk_tokens // len(rows), self.cache.columns - 1))
        for tokens in (width, 1):
            ids = torch.zeros((len(rows), tokens), dtype=torch.long, device=self.device)
            self._forward_into_cache(rows, [tokens] * len(rows), ids, contextlib.nullcontext())
        for row in rows:
            self.cache.reset_row(row)

    def _gather_burst(self) -> None:
        """Called idle, with the lock held, once requests wait: let the rest of a burst arrive.
        Requests that reach a server together (a client's batch, a gateway's fan-out) still land
        one by one; starting on the first leaves the rest for a second prefill a whole prefill
        later (measured over gRPC: 32 requests prefilled in two steps, first tokens 0.4-0.65 s
        against 0.33 s for one batch). Running requests are never held up: only an idle engine
        waits."""
        deadline = time.monotonic() + self.admission_window_s * _BURST_WINDOWS
        seen = len(self.scheduler.waiting)
        while not self._stop and seen < self.scheduler.free_rows and time.monotonic() < deadline:
            self._lock.wait(timeout=self.admission_window_s)
            if len(self.scheduler.waiting) == seen:
                return  # a whole window without a new arrival: the burst is in
            seen = len(self.scheduler.waiting)

    def run_once(self) -> bool:
        """One iteration of the loop: retire cancelled requests, admit waiting ones, prefill,
        decode. The engine thread calls it; tests call it directly on an engine never started,
        to control exactly when requests join. Returns whether any request is still in flight."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, []
            for sequence in cancelled:
                if not sequence.done:
                    self._finish(sequence, FinishReason.CANCELLED)
            self.scheduler.admit(self._try_start)
            merge_requests, self._merge_requests = self._merge_requests, deque()
        with torch.inference_mode():
            for action, key, future in merge_requests:
                self._apply_admin_merge_change(action, key, future)
            self.step()
            if self.hot_merge_policy is not None:
                self._follow_hot_merge_policy()
        with self._lock:
            return bool(self.scheduler.running or self.scheduler.waiting)

    # --- the merged adapter (engine thread, between steps) -------------------------------------

    def _apply_admin_merge_change(self, action: str, key: AdapterKey | None, future: Future) -> None:
        try:
            if action == "merge":
                changed = self.lora.merged != key
                result = self.lora.merge(key)
                self._merged_by_admin = True
            else:
                changed = self.lora.merged is not None
                result = self.lora.unmerge()
                self._merged_by_admin = False
        except Exception as error:  # refused: nothing changed
            future.set_exception(error)
            return
        if changed:
            self._merge_changed(action, "admin", key or result)
        future.set_result(result)

    def _follow_hot_merge_policy(self) -> None:
        now = time.monotonic()
        if now < self._next_hot_check or self._merged_by_admin:
            return
        self._next_hot_check = now + _HOT_MERGE_CHECK_S
        decision = self.hot_merge_policy.decide(now, self.lora.merged)
        if decision is None:
            return
        if decision.action == "unmerge":
            self.lora.unmerge()
        else:
            from shard.lora.errors import MergeRefusedError

            try:
                self.lora.merge(decision.adapter)
            except MergeRefusedError as error:  # not on a device slot at this moment: ask again later
                log.info("hot adapter %s not merged: %s", decision.adapter, error)
                return
        log.info("hot adapter policy: %s at %.0f%% of recent tokens", decision.action, 100 * decision.share)
        self._merge_changed(decision.action, "auto", decision.adapter)

    def _merge_changed(self, action: str, trigger: str, key: AdapterKey) -> None:
        log.info("%s %s into the base weights (%s)", "merged" if action == "merge" else "unmerged", key, trigger)
        if self.hot_merge_policy is not None:
            self.hot_merge_policy.changed(time.monotonic())
        if self.metrics is not None:
            self.metrics.observe_merge_change(action, trigger)

    def _has_work(self) -> bool:
        if self._cancelled or self.scheduler.running or self._merge_requests:
            return True
        if self.scheduler.waiting and self.scheduler.free_rows:
            now = time.monotonic()
            return any(self._adapter_retry_at.get(s.request.adapter, 0) <= now for s in self.scheduler.waiting)
        return False

    def _try_start(self, sequence: _Sequence) -> bool:
        key = sequence.request.adapter
        if key is None:
            return True
        if self._adapter_retry_at.get(key, 0) > time.monotonic():
            return False
        lease = self.lora.try_acquire(key)
        if lease is not None:
            self._adapter_retry_at.pop(key, None)
            sequence.lora_lease = lease
            return True
        error = self.lora.take_load_error(key)
        if error is not None:
            # One attempt per request: the next request for this adapter tries again.
            self._adapter_retry_at.pop(key, None)
            self.scheduler.remove_waiting(sequence)
            self._fail(sequence, error)
            return False
        self._adapter_retry_at[key] = time.monotonic() + _ADAPTER_RETRY_S
        return False

    def step(self) -> None:
        """One iteration: a prefill forward for staged requests (if any), then one decode
        forward over every decoding request."""
        if self.prefix_cache is not None:
            self._reuse_prefixes()
        chunks = self.scheduler.prefill_chunks(self.prefill_chunk_tokens)
        if chunks:
            self._prefill(chunks)
        if self.scheduler.decoding:
            self._decode()

    def _reuse_prefixes(self) -> None:
        """Staged requests not yet started take their prompt's cached prefix (same adapter
        version only) into their row. Done in the step that gives them their first chunk, not at
        admission, so a request admitted with others reuses what those computed in earlier steps."""
        budget = self.prefill_chunk_tokens
        for sequence in self.scheduler.prefilling:
            if budget <= 0:
                break
            if not sequence.prefix_checked and not sequence.prefilled:
                sequence.prefix_checked = True
                sequence.prefilled = self.prefix_cache.load_into(
                    sequence.request.adapter, sequence.prompt_ids, self.cache, sequence.row
                )
            budget -= len(sequence.prompt_ids) - sequence.prefilled

    def _forward(self, sequences: list[_Sequence], rows: list[int], inputs: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in inputs)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in inputs], device=self.device)
        adapters = (
            self.lora.batch([s.lora_lease.entries if s.lora_lease is not None else () for s in sequences])
            if self.lora is not None
            else contextlib.nullcontext()
        )
        out = self._forward_into_cache(rows, [len(x) for x in inputs], ids, adapters)
        if self.hot_merge_policy is not None:
            self._observe_traffic(sequences, inputs)
        return out.logits[:, -1, :].float()

    def _forward_into_cache(self, rows: list[int], lengths: list[int], ids: torch.Tensor,
                            adapters: contextlib.AbstractContextManager):
        """One forward of `ids` (left-padded to their widest row) into those rows of the KV cache,
        under `adapters`: the cache keeps what it wrote if the forward returns, nothing if it raises."""
        plan = self.cache.plan(rows, lengths)
        try:
            with adapters:
                out = self._model_forward(
                    input_ids=ids,
                    attention_mask=plan.attention_mask,
                    position_ids=plan.position_ids,
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=self._last_position(ids.shape[1]),
                )
        except BaseException:
            self.cache.abort()
            raise
        self.cache.commit()
        return out

    def _observe_traffic(self, sequences: list[_Sequence], inputs: list[list[int]]) -> None:
        """Tokens per adapter version for the hot-adapter policy. Only a row of one adapter at
        weight 1 would do no LoRA work with that adapter merged: base rows and mix rows count as
        None (traffic that no merge serves)."""
        tokens: Counter = Counter()
        for sequence, row_inputs in zip(sequences, inputs):
            lease = sequence.lora_lease
            single = lease is not None and len(lease.keys) == 1 and lease.entries[0][1] == 1.0
            tokens[lease.keys[0] if single else None] += len(row_inputs)
        self.hot_merge_policy.observe(time.monotonic(), tokens)

    def _last_position(self, width: int) -> int | torch.Tensor:
        """Which input position the model computes logits for: the last (inputs are left-padded).
        As an index tensor when width > 1: the model's own ``logits_to_keep=1`` slices a strided
        view, and the LM head's matmul on that view broadcasts its weight to every row (a copy of
        batch x vocab x hidden values, most of a prefill step's time on CPU)."""
        if width == 1:
            return 1
        return torch.tensor([width - 1], device=self.device)

    def _prefill(self, chunks: list[PrefillChunk]) -> None:
        sequences = [c.sequence for c in chunks]
        started = time.perf_counter()
        try:
            logits = self._forward(
                sequences,
                [s.row for s in sequences],
                [c.sequence.prompt_ids[c.start : c.start + c.count] for c in chunks],
            )
        except Exception as error:
            with self._lock:
                for s in sequences:
                    self._fail(s, error)
            raise
        if self.metrics is not None:
            self.metrics.observe_step("prefill", time.perf_counter() - started, len(sequences))
        done = [(i, c.sequence) for i, c in enumerate(chunks) if c.completes]
        self._prefill_tokens += sum(c.count for c in chunks)
        for c in chunks:
            c.sequence.prefilled += c.count
            if self.prefix_cache is not None:
                self.prefix_cache.store_from(
                    c.sequence.request.adapter, c.sequence.prompt_ids, self.cache, c.sequence.row, c.sequence.prefilled
                )
        if not done:
            return
        tokens = sample_batch(logits[[i for i, _ in done]], [s.sampler for _, s in done])
        with self._lock:
            for (i, sequence), token in zip(done, tokens):
                if sequence.done:
                    continue
                self.scheduler.prefill_done(sequence)
                self._append(sequence, token, logits[i])

    def _decode(self) -> None:
        sequences = list(self.scheduler.decoding)
        started = time.perf_counter()
        try:
            logits = self._forward(
                sequences, list(range(len(sequences))), [[s.generated[-1]] for s in sequences]
            )
        except Exception as error:
            with self._lock:
                for s in sequences:
                    self._fail(s, error)
            raise
        tokens = sample_batch(logits, [s.sampler for s in sequences])
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe_step("decode", elapsed, len(sequences))
        with self._lock:
            now = time.monotonic()
            self._decode_window.append((now, elapsed, len(sequences)))
            while self._decode_window and now - self._decode_window[0][0] > _THROUGHPUT_WINDOW_S:
                self._decode_window.popleft()
            for i, (sequence, token) in enumerate(zip(sequences, tokens)):
                if not sequence.done:
                    self._append(sequence, token, logits[i])

    # --- per-token bookkeeping (called with the lock held) --------------------------------------

    def _append(self, sequence: _Sequence, token: int, logits: torch.Tensor) -> None:
        sequence.generated.append(token)
        self._tokens += 1
        if self.record_logits:
            sequence.unsent_logits.append(logits.detach().cpu())
        if token in self.eos_ids:
            self._finish(sequence, FinishReason.STOP)
            return
        sequence.unsent_ids.append(token)
        released = sequence.stops.feed(sequence.detokenizer.add(token))
        sequence.unsent_text += released.text
        if released.stopped:
            self._finish(sequence, FinishReason.STOP, flush=False)
        elif len(sequence.generated) >= sequence.max_tokens:
            self._finish(sequence, FinishReason.LENGTH)
        elif sequence.unsent_text and (
            not sequence.sent_first or len(sequence.unsent_ids) >= sequence.request.stream_interval
        ):
            self._send(sequence)

    def _send(self, sequence: _Sequence, finish: FinishReason | None = None) -> None:
        """Everything not sent yet (text, token ids, logits) as one chunk; the last one carries
        ``finish`` and the usage."""
        usage = None
        if finish is not None:
            usage = Usage(len(sequence.prompt_ids), len(sequence.generated))
        elif not sequence.unsent_text and not sequence.unsent_ids:
            return
        chunk = GenerationChunk(
            text=sequence.unsent_text,
            token_ids=tuple(sequence.unsent_ids),
            finish_reason=finish,
            usage=usage,
            adapter=None if sequence.sent_first else sequence.request.adapter,
            logits=torch.stack(sequence.unsent_logits) if sequence.unsent_logits else None,
        )
        sequence.unsent_text = ""
        sequence.unsent_ids = []
        sequence.unsent_logits = []
        sequence.sent_first = True
        sequence.handle._emit(chunk)

    def _finish(self, sequence: _Sequence, reason: FinishReason, flush: bool = True) -> None:
        if flush and reason is not FinishReason.CANCELLED:
            released = sequence.stops.feed(sequence.detokenizer.flush())
            sequence.unsent_text += released.text if released.stopped else released.text + sequence.stops.flush()
        self._release(sequence)
        self._completed += 1
        self._send(sequence, finish=reason)

    def _fail(self, sequence: _Sequence, error: BaseException) -> None:
        self._release(sequence)
        sequence.handle._fail(error)

    def _release(self, sequence: _Sequence) -> None:
        if sequence.done:
            return
        sequence.done = True
        self.scheduler.retire(sequence)
        if sequence.lora_lease is not None:
            lease, sequence.lora_lease = sequence.lora_lease, None
            self.lora.release(lease)
