"""An in-flight-batching engine like TensorRT-LLM's, in iterations, with a paged KV cache.

Each iteration (`schedule` then `complete`) runs every decoding request for one token plus as
many new or continuing prefills ("context" requests) as `max_batch_size`, `max_num_tokens` and
the KV cache allow, in arrival order. The scheduler policy decides KV admission:

- guaranteed_no_evict: a request starts only if blocks for prompt + max_tokens can be reserved,
  so a running request is never paused;
- max_utilization: a request starts if its prompt fits now; when decoding needs a block and none
  is free, the most recently started requests are paused (KV freed) and later recomputed.

Decoding is tracked in aggregate so an iteration costs O(1) Python work, not O(batch): a request
that starts decoding at iteration k with L tokens has L + (j - k) tokens after iteration j, so
it needs a new block exactly when j = (1 - L + k) mod tokens_per_block (its *residue*), and it
finishes at a known iteration (a heap). KV blocks in use and the decode context sum are kept as
running totals; `audit()` recomputes them from scratch for tests.

    block:   |<-- tokens_per_block -->|<-- tokens_per_block -->|
    tokens:  [ p p p p p p p p p p p p | p p g g g . . . . . . ]  blocks = ceil(L / tpb)
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from agent.domain import Request
from agent.twin.memory import EngineConfig, SchedulerPolicy


def _blocks(tokens: int, tokens_per_block: int) -> int:
    return -(-tokens // tokens_per_block)


def served_tokens(request: Request) -> int:
    """Tokens the engine generates for `request`: its true length, capped by its max_tokens."""
    return min(request.output_tokens or request.max_tokens, request.max_tokens)


class RequestRejectedError(ValueError):
    """The engine can never serve this request (too long for its limits)."""


@dataclass(slots=True, eq=False)
class _Sequence:
    request: Request
    seq_no: int  # admission order; the latest admitted is paused first
    target_tokens: int  # tokens it will generate (its true length, capped by max_tokens)
    reserved_blocks: int  # blocks for prompt + max_tokens (guaranteed_no_evict)
    context_len: int  # tokens the current context phase must process (prompt, + output if resumed)
    prefilled: int = 0  # of those, processed so far
    generated: int = 0  # tokens emitted, as of `decode_start_iter` while decoding
    decode_start_iter: int = -1  # iteration whose end `generated` refers to; -1 if not decoding
    blocks: int = 0  # blocks held (kept current outside decoding)
    residue: int = 0
    version: int = 0  # bumps when it leaves decoding, invalidating its heap entry
    first_token_s: float | None = None
    last_token_s: float | None = None
    preemptions: int = 0
    reserved: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """What one iteration runs."""

    iteration: int
    decode_seqs: int
    decode_context_tokens: int  # tokens the decoding requests read from the KV cache
    prefill_chunks: tuple[tuple[int, int], ...]  # (new tokens, tokens already cached) per context request
    context: tuple[_Sequence, ...] = field(repr=False)

    @property
    def tokens(self) -> int:
        """Tokens processed this iteration."""
        return self.decode_seqs + sum(chunk for chunk, _ in self.prefill_chunks)


@dataclass(frozen=True, slots=True)
class FinishedRequest:
    """A request that produced all its tokens."""

    request: Request
    first_token_s: float
    finish_s: float
    output_tokens: int
    preemptions: int


@dataclass(frozen=True, slots=True)
class IterationOutcome:
    """What an iteration produced, for metrics and statistics."""

    iteration: int
    start_s: float
    end_s: float
    decode_tokens: int  # tokens from requests that also emitted in the previous iteration
    first_token_ids: tuple[int, ...]  # requests that emitted their first token
    resumed_gaps_s: tuple[float, ...]  # token gaps of requests resuming after a pause
    finished: tuple[FinishedRequest, ...]
    context_tokens: int
    context_requests: int
    decode_requests: int


class Engine:
    """Iteration-level scheduler and KV-cache bookkeeping of one engine instance."""

    def __init__(self, config: EngineConfig, kv_blocks: int, max_seq_len: int) -> None:
        self.config = config
        self.kv_blocks = kv_blocks
        self.max_seq_len = max_seq_len
        self.iteration = 0  # iterations completed
        self.used_blocks = 0
        self.reserved_blocks = 0
        self.waiting: deque[_Sequence] = deque()  # not started, or paused
        self.contexts: list[_Sequence] = []  # started, prefill not finished (chunked)
        self._decoding: dict[int, _Sequence] = {}
        self._finish_heap: list[tuple[int, int, int]] = []  # (finish iteration, seq_no, version)
        self._residue_counts = [0] * config.tokens_per_block
        self._decode_context = 0  # sum of tokens cached by decoding requests
        self._seq_no = 0
        self._last_end_s = 0.0  # end of the latest iteration: when every decoding request last emitted
        self.completed_requests = 0
        self.preemptions = 0
        self.paused_requests = 0  # paused requests waiting to resume

    # -- intake ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue `request`; raises RequestRejectedError if the engine can never serve it."""
        cfg = self.config
        if request.prompt_tokens < 1 or request.max_tokens < 1:
            raise RequestRejectedError("prompt and max_tokens must be at least 1 token")
        total = request.prompt_tokens + request.max_tokens
        if total > self.max_seq_len:
            raise RequestRejectedError(
                f"prompt {request.prompt_tokens} + max_tokens {request.max_tokens} "
                f"exceeds max_seq_len {self.max_seq_len}"
            )
        if not cfg.chunked_context and request.prompt_tokens > cfg.max_num_tokens:
            raise RequestRejectedError(
                f"prompt {request.prompt_tokens} exceeds max_num_tokens {cfg.max_num_tokens} "
                "without chunked context"
            )
        reserve = _blocks(total, cfg.tokens_per_block)
        if reserve > self.kv_blocks:
            raise RequestRejectedError(f"needs {reserve} KV blocks, the cache has {self.kv_blocks}")
        target = served_tokens(request)
        self._seq_no += 1
        self.waiting.append(
            _Sequence(
                request=request,
                seq_no=self._seq_no,
                target_tokens=target,
                reserved_blocks=reserve,
                context_len=request.prompt_tokens,
            )
        )

    def has_work(self) -> bool:
        """Whether another iteration would do anything."""
        return bool(self._decoding or self.contexts or self.waiting)

    @property
    def decoding_requests(self) -> int:
        """Requests in the generation phase."""
        return len(self._decoding)

    @property
    def active_requests(self) -> int:
        """Requests started and not finished (decoding or mid-prefill)."""
        return len(self._decoding) + len(self.contexts)

    # -- one iteration -----------------------------------------------------------------------
    def schedule(self) -> Batch:
        """Choose the next iteration's batch and allocate its KV blocks."""
        cfg = self.config
        it = self.iteration
        new_decode_blocks = self._residue_counts[it % cfg.tokens_per_block]
        if cfg.scheduler is SchedulerPolicy.MAX_UTILIZATION:
            while self._decoding and self.used_blocks + new_decode_blocks > self.kv_blocks:
                self._pause_latest()
                new_decode_blocks = self._residue_counts[it % cfg.tokens_per_block]
        self.used_blocks += new_decode_blocks

        decode_seqs = len(self._decoding)
        decode_context = self._decode_context
        budget = cfg.max_num_tokens - decode_seqs
        slots = cfg.max_batch_size - decode_seqs
        chunks: list[tuple[int, int]] = []
        scheduled: list[_Sequence] = []
        for seq in self.contexts:  # continuing chunked prefills go first
            if slots <= 0 or budget <= 0:
                break
            chunk = min(seq.context_len - seq.prefilled, budget)
            if not self._allocate_context(seq, chunk):
                break
            chunks.append((chunk, seq.prefilled))
            scheduled.append(seq)
            budget -= chunk
            slots -= 1
        while self.waiting and slots > 0 and budget > 0:
            seq = self.waiting[0]
            remaining = seq.context_len
            # A paused request's recompute (prompt + output so far) may exceed max_num_tokens;
            # it is always chunked so it can resume.
            if remaining > budget and not (cfg.chunked_context or seq.preemptions):
                break
            chunk = min(remaining, budget)
            if not self._admit(seq) or not self._allocate_context(seq, chunk):
                break
            self.waiting.popleft()
            if seq.preemptions:
                self.paused_requests -= 1
            self.contexts.append(seq)
            chunks.append((chunk, 0))
            scheduled.append(seq)
            budget -= chunk
            slots -= 1
        return Batch(it, decode_seqs, decode_context, tuple(chunks), tuple(scheduled))

    def _admit(self, seq: _Sequence) -> bool:
        if self.config.scheduler is SchedulerPolicy.GUARANTEED_NO_EVICT and not seq.reserved:
            if self.reserved_blocks + seq.reserved_blocks > self.kv_blocks:
                return False
            self.reserved_blocks += seq.reserved_blocks
            seq.reserved = True
        return True

    def _allocate_context(self, seq: _Sequence, chunk: int) -> bool:
        """Hold blocks for the chunk (and the first token if the chunk ends the prefill)."""
        done = seq.prefilled + chunk
        tokens = done + 1 if done == seq.context_len else done
        extra = _blocks(tokens, self.config.tokens_per_block) - seq.blocks
        if self.used_blocks + extra > self.kv_blocks:
            return False  # only under max_utilization: a reservation always covers its blocks
        self.used_blocks += extra
        seq.blocks += extra
        return True

    def _pause_latest(self) -> None:
        """Preempt the most recently admitted decoding request (max_utilization)."""
        seq = max(self._decoding.values(), key=lambda s: s.seq_no)
        self._leave_decoding(seq, self.iteration - 1)
        seq.last_token_s = self._last_end_s
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        seq.context_len = seq.request.prompt_tokens + seq.generated
        seq.prefilled = 0
        seq.preemptions += 1
        self.preemptions += 1
        self.paused_requests += 1
        self.waiting.appendleft(seq)

    def _leave_decoding(self, seq: _Sequence, as_of_iter: int) -> None:
        """Materialise a decoding request's state as of the end of iteration `as_of_iter`."""
        del self._decoding[seq.seq_no]
        seq.generated += as_of_iter - seq.decode_start_iter
        length = seq.request.prompt_tokens + seq.generated
        seq.blocks = _blocks(length, self.config.tokens_per_block)
        self._decode_context -= length
        self._residue_counts[seq.residue] -= 1
        seq.decode_start_iter = -1
        seq.version += 1

    def complete(self, batch: Batch, start_s: float, end_s: float) -> IterationOutcome:
        """Apply the tokens `batch` produced in an iteration that ran from start_s to end_s."""
        if end_s <= start_s:
            raise ValueError("an iteration must take positive time")
        it = batch.iteration
        self._decode_context += len(self._decoding)
        finished: list[FinishedRequest] = []
        while self._finish_heap and self._finish_heap[0][0] <= it:
            _, seq_no, version = heapq.heappop(self._finish_heap)
            seq = self._decoding.get(seq_no)
            if seq is None or seq.version != version:
                continue
            self._leave_decoding(seq, it)
            finished.append(self._finish(seq, end_s))

        first_token_ids: list[int] = []
        resumed_gaps: list[float] = []
        context_tokens = 0
        for seq, (chunk, _) in zip(batch.context, batch.prefill_chunks, strict=True):
            seq.prefilled += chunk
            context_tokens += chunk
            if seq.prefilled < seq.context_len:
                continue
            self.contexts.remove(seq)
            seq.generated += 1
            if seq.first_token_s is None:
                seq.first_token_s = end_s
                first_token_ids.append(seq.request.request_id)
            else:
                resumed_gaps.append(end_s - (seq.last_token_s or end_s))
            seq.last_token_s = end_s
            if seq.generated >= seq.target_tokens:
                finished.append(self._finish(seq, end_s))
            else:
                self._enter_decoding(seq, it)

        self.iteration += 1
        self._last_end_s = end_s
        return IterationOutcome(
            iteration=it,
            start_s=start_s,
            end_s=end_s,
            decode_tokens=batch.decode_seqs,
            first_token_ids=tuple(first_token_ids),
            resumed_gaps_s=tuple(resumed_gaps),
            finished=tuple(finished),
            context_tokens=context_tokens,
            context_requests=len(batch.context),
            decode_requests=batch.decode_seqs,
        )

    def _enter_decoding(self, seq: _Sequence, it: int) -> None:
        length = seq.request.prompt_tokens + seq.generated
        seq.decode_start_iter = it
        seq.residue = (1 - length + it) % self.config.tokens_per_block
        self._residue_counts[seq.residue] += 1
        self._decode_context += length
        self._decoding[seq.seq_no] = seq
        heapq.heappush(self._finish_heap, (it + seq.target_tokens - seq.generated, seq.seq_no, seq.version))

    def _finish(self, seq: _Sequence, end_s: float) -> FinishedRequest:
        self.used_blocks -= seq.blocks
        seq.blocks = 0
        if seq.reserved:
            self.reserved_blocks -= seq.reserved_blocks
            seq.reserved = False
        self.completed_requests += 1
        assert seq.first_token_s is not None
        return FinishedRequest(seq.request, seq.first_token_s, end_s, seq.generated, seq.preemptions)

    # -- checks ------------------------------------------------------------------------------
    def audit(self) -> dict[str, int]:
        """Recompute the running totals from every request (for tests; O(requests))."""
        tpb = self.config.tokens_per_block
        used = sum(s.blocks for s in self.contexts)
        context = 0
        for seq in self._decoding.values():
            length = seq.request.prompt_tokens + seq.generated + (self.iteration - 1 - seq.decode_start_iter)
            used += _blocks(length, tpb)
            context += length
        reserved = sum(s.reserved_blocks for s in (*self.contexts, *self._decoding.values()) if s.reserved)
        return {"used_blocks": used, "decode_context": context, "reserved_blocks": reserved}

    @property
    def decode_context_tokens(self) -> int:
        """Sum of cached tokens over decoding requests (the running total `audit` checks)."""
        return self._decode_context
