"""The batching loop: concurrent generation on one ORT GenAI model, requests that arrive together
decoded as one generator batch.

One worker thread owns generation. Callers talk to it through a queue of commands (``Submit``,
``Cancel``): ``submit`` hands it a ``GenerationRequest`` (token ids and search options) plus a sink
(a callable the worker calls with each ``Delta`` and the final ``Done`` or ``Failed``); a caller
that goes away calls ``cancel`` and gets one last ``Done("cancelled")``, then nothing. A sink that
raises ends its own request only (as if cancelled); its batch-mates go on. ``events`` and
``aevents`` are the one event pump, blocking and asyncio, that the pyfunc and the server read a
request's events through. Stop strings are cut here, as the tokens arrive (``truncate_at_stop``,
``held_back``).

An idle worker starts what is waiting at once (requests submitted together, ``submit_many``, are
seen together); while batches run, a new request waits ``GATHER_S`` for companions. It decodes up
to ``max_batch_size`` requests with the same sampling settings as one ORT GenAI generator batch:
prompts right-padded with the model's pad token, as ``Tokenizer.encode_batch`` pads them, so each
row's greedy tokens are the ones it gets alone (measured: 132 of 132 real questions). og's CPU
generator takes no rows once it runs, so a request that arrives while batches decode starts as a
batch of its own, and the worker steps up to ``max_generators`` batches, one token at a time, each
time the one that has had the least of its time (a batch's prefill counts against it once its first
token is out), within one KV-cache budget. One exception: a lone greedy request a few tokens old,
joined by a burst, is restarted with it as one batch (``MERGE_TOKENS``; its tokens so far are
decoded again, checked, and not sent twice). A batch ends when every row has (end token, its own ``max_tokens``,
a stop string, or its caller gone). og.Engine is not used: on CPU its static scheduler batches a
fixed 4 requests whatever ``max_batch_size`` says (0.18), and its continuous batching needs a
paged-attention export the builder makes only for CUDA and WebGPU; bench/README.md has the
measurements. More than ``max_waiting`` requests in the loop at once are refused with
``Overloaded`` (the server answers 503), so a flood queues no unbounded work.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from phi3mlflow.errors import Overloaded

MAX_WAITING = 64
# ORT GenAI's random_seed takes 0 .. 2**31 - 2; a request's seed (any integer) is taken modulo this.
SEED_RANGE = 2_147_483_647
# Generators stepped in turn: a request arriving while a batch decodes starts as a batch of its own
# at the next round instead of waiting for that batch's longest answer (og's CPU generator takes no
# rows once it runs). Each round costs every running batch's step.
MAX_GENERATORS = 4
# While batches run, how long a newly arrived request waits for companions before it starts as a
# batch of its own (the running batches keep stepping meanwhile).
GATHER_S = 0.02
# A lone greedy request this young (no more tokens than this) is restarted together with at least
# MERGE_JOINING greedy requests that arrive now, as one batch: its first tokens are decoded again
# and checked, not sent again. A burst whose first request started alone at once (an idle loop
# waits for no one) then decodes as one batch instead of two generators stepped in turn.
MERGE_TOKENS = 8
MERGE_JOINING = 2
# The prompt cache (BatchLoop's ``prompt_cache``, on in the server): how many finished lone greedy
# generators are kept, their KV cache within the loop's KV budget, so that a later lone greedy
# request sharing a prefix with one's tokens (a repeated system prompt, the next turn of a chat)
# rewinds it to the shared prefix and appends only the rest, instead of a whole prefill.
PROMPT_CACHE_SLOTS = 4
# A cacheable generator's length is rounded up to a multiple of this, so that a later request of a
# slightly longer prompt or answer still fits in it (its KV cache is allocated at that length).
PROMPT_CACHE_BLOCK = 128
# The fewest prompt tokens a cached generator appends: one token alone is computed by other kernels
# than a prefill's, with other rounding (bench/README.md, the prompt cache).
MIN_APPENDED = 2
# A request that took at least this share of a cached prompt proves that prompt comes back (the same
# prompt again, a chat's next turn, a long system prompt shared): its own generator is kept over
# those never proven, and a proven one is taken only by such a request, not for a chat template's
# opening that every prompt shares.
PROVEN_SHARE = 0.75

__all__ = ["BatchLoop", "Cancel", "Delta", "Done", "Failed", "GenerationRequest", "Overloaded", "Submit"]


@dataclass(frozen=True)
class GenerationRequest:
    """What one request asks the batching loop for: prompt token ids and search options."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # sampling only: the same seed gives the same answer (decoded alone)
    guidance: tuple[str, str] | None = None  # (type, text) for GeneratorParams.set_guidance: constrained output
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely (k <= 20)


@dataclass(frozen=True)
class Delta:
    text: str
    # With logprobs asked for: one entry per token behind ``text`` (OpenAI's logprobs.content items).
    logprobs: list[dict] | None = None


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" or "length" (OpenAI's), "cancelled" when the caller cancelled
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those the prompt cache had (not computed again)


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class Submit:
    """A command to the worker: decode ``request``, telling ``sink`` what happens."""

    ticket: int
    request: GenerationRequest
    sink: Sink
    at: float = field(default_factory=time.monotonic)  # when it was submitted


@dataclass(frozen=True)
class Cancel:
    """A command to the worker: the caller of ``ticket`` went away."""

    ticket: int


Command = Submit | Cancel


def truncate_at_stop(text: str, stop: list[str], start: int = 0) -> tuple[str, bool]:
    """``text`` cut before the stop string that ends first (OpenAI leaves it out), and whether one was
    found. Ends first, not starts first: a stream stops at the first stop string it completes, so
    with ``["blue", " blue,"]`` "The sky is blue, ..." ends "The sky is " whether streamed or not.
    ``start``: where a match may begin (a stream searches only what the last token could complete)."""
    found = [(i + len(s), i) for s in stop if (i := text.find(s, start)) >= 0]
    return (text[: min(found)[1]], True) if found else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop string: a stream
    holds them back until the next token says whether they are."""
    return max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def start_generator(og, model, ids, max_length: int, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, guidance: tuple[str, str] | None = None):  # fmt: skip
    """The one ORT GenAI generator setup: ``ids`` (one prompt, or rows of one length, right-padded)
    appended, greedy when ``temperature`` is 0, sampling with ``temperature`` and ``top_p`` otherwise
    (from ``seed``, when given); ``guidance`` constrains every row's output (a JSON schema, say)."""
    rows = np.asarray(ids, dtype=np.int32)
    if rows.ndim == 1:
        rows = rows[None, :]
    search: dict[str, int | float | bool] = {"max_length": max_length, "batch_size": int(rows.shape[0])}
    if temperature > 0:
        search.update(do_sample=True, temperature=temperature, top_p=top_p)
        if seed is not None:
            search["random_seed"] = seed % SEED_RANGE
    else:
        search.update(do_sample=False)
    params = og.GeneratorParams(model)
    params.set_search_options(**search)
    if guidance is not None:
        params.set_guidance(*guidance)
    generator = og.Generator(model, params)
    generator.append_tokens(rows)
    return generator


@dataclass
class _Row:
    """One request in the running batch."""

    ticket: int
    request: GenerationRequest
    sink: Sink
    decoder: object
    text: str = ""
    sent: int = 0
    generated: int = 0
    finished: bool = False
    logprobs: list[dict] = field(default_factory=list)  # entries not yet delivered
    tokens: list[int] = field(default_factory=list)  # its first MERGE_TOKENS generated
    cached: int = 0  # prompt tokens taken from the prompt cache, not computed again
    took: int = 0  # how many the cached prompt it took them from could give (_reusable)
    replay: int = 0  # after a restart: how many of ``tokens`` the new generator decodes again


@dataclass
class _Batch:
    """One running ORT GenAI generator and its rows."""

    rows: list[_Row]
    generator: Any  # an og.Generator (or the fast tests' stand-in); None until started
    scored: bool  # some row wants logprobs: read the logits before each step
    kv_bytes: int  # the KV cache it may grow to
    used: float = 0.0  # seconds of the worker's time charged to it (its steps, then its prefill)
    debt: float = 0.0  # its prefill's seconds, charged after its first step
    max_length: int = 0  # its generator's length (prompt and answer): a cached one takes what fits


@dataclass(eq=False)  # compared by identity (list.remove)
class _Cached:
    """A finished lone greedy generator kept for the prompt cache, and its prompt's tokens."""

    tokens: np.ndarray
    generator: Any
    max_length: int
    kv_bytes: int
    proven: bool  # its request took PROVEN_SHARE or more of what it could from the cache: its prompt comes back


class BatchLoop:
    """The worker thread around one ORT GenAI model; a daemon, started with the object.

    ``og`` is the onnxruntime_genai module (or a scripted stand-in with the same generator calls:
    the fast tests drive the loop that way), ``model`` and ``tokenizer`` its model and tokenizer."""

    def __init__(self, og, model, tokenizer, eos: set[int], pad: int, context_length: int, max_batch_size: int,
                 kv_bytes_per_token: int = 0, max_batch_kv_bytes: int = 0, max_waiting: int = MAX_WAITING,
                 max_generators: int = MAX_GENERATORS, prompt_cache: bool = False):  # fmt: skip
        self.og, self.model, self.tokenizer, self.eos, self.pad = og, model, tokenizer, eos, pad
        self.context_length, self.max_batch_size, self.max_waiting = context_length, max_batch_size, max_waiting
        self.kv_bytes_per_token, self.max_batch_kv_bytes = kv_bytes_per_token, max_batch_kv_bytes
        self.max_generators = max(1, max_generators)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._tickets = itertools.count()
        self._count_lock = threading.Lock()
        self._in_loop = 0
        self._broken = ""
        self._waiting: list[Submit] = []
        self._active: list[_Batch] = []
        # Batches decoded so far and the tickets of the last one: what the fast tests assert batching on.
        self.batches = 0
        self.last_batch: tuple[int, ...] = ()
        self.merges = 0  # lone young requests restarted with a burst (MERGE_TOKENS)
        # The prompt cache (PROMPT_CACHE_SLOTS); set before the first request. Its figures, in prompt
        # tokens as vLLM counts its prefix cache's: looked up (every lone greedy request's) and found.
        self.prompt_cache = prompt_cache
        self.prompt_cache_queries = 0
        self.prompt_cache_hits = 0
        # Told (tokens looked up, tokens found) at each lookup (the server's /metrics); on the worker thread.
        self.on_prompt_cache: Callable[[int, int], None] | None = None
        self._cache: list[_Cached] = []
        # Told each batch's size as it starts (the server's /metrics); called on the worker thread.
        self.on_batch: Callable[[int], None] | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._main, name="og-batches", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) --------------------------------------------------------------

    @property
    def in_loop(self) -> int:
        """Requests submitted and not yet finished (waiting or decoding)."""
        return self._in_loop

    def submit(self, request: GenerationRequest, sink: Sink) -> int:
        """Queue ``request``; its events go to ``sink`` on the worker thread. Returns a ticket for cancel.
        Raises Overloaded beyond ``max_waiting`` requests in the loop, RuntimeError once the worker died."""
        with self._count_lock:
            if self._broken:
                raise RuntimeError(self._broken)
            if self._in_loop >= self.max_waiting:
                raise Overloaded(f"{self._in_loop} requests are in progress; try again shortly")
            self._in_loop += 1
        ticket = next(self._tickets)
        self._inbox.put(Submit(ticket, request, sink))
        return ticket

    def submit_many(self, requests: list[tuple[GenerationRequest, Sink]]) -> list[int]:
        """``submit`` for requests sent together: the worker sees them at once, so those that can
        share a batch do. All or none are taken (Overloaded, RuntimeError as ``submit``)."""
        with self._count_lock:
            if self._broken:
                raise RuntimeError(self._broken)
            if self._in_loop + len(requests) > self.max_waiting:
                raise Overloaded(f"{self._in_loop} requests are in progress; {len(requests)} more do not fit")
            self._in_loop += len(requests)
        submits = [Submit(next(self._tickets), request, sink) for request, sink in requests]
        self._inbox.put(submits)  # type: ignore[arg-type]
        return [item.ticket for item in submits]

    def cancel(self, ticket: int) -> None:
        self._inbox.put(Cancel(ticket))

    def close(self) -> None:
        """End the worker once nothing is waiting or decoding (a server that swapped to another
        model version releases this one so); later submits fail."""
        with self._count_lock:
            self._closing = True
            self._broken = self._broken or "this model was released"
        self._inbox.put(Cancel(-1))  # wakes the worker

    def join(self, timeout: float | None = None) -> bool:
        """Whether the worker has ended (within ``timeout`` s)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def complete_all(self, requests: list[GenerationRequest]) -> list[tuple[str, Done]]:
        """Every request's whole answer and its Done, submitted together so that they decode as batches
        (of up to max_batch_size, in the order given; the rest start as a batch finishes). Raises
        RuntimeError when one fails, after the others are cancelled."""
        results: list[list] = [[[], None] for _ in requests]
        finished = threading.Semaphore(0)
        failures: list[Failed] = []

        def sink_for(i: int) -> Sink:
            def sink(event: Event) -> None:
                if isinstance(event, Delta):
                    results[i][0].append(event.text)
                else:
                    results[i][1] = event
                    if isinstance(event, Failed):
                        failures.append(event)
                    finished.release()

            return sink

        tickets: list[int] = []
        try:
            tickets = self.submit_many([(request, sink_for(i)) for i, request in enumerate(requests)])
            for _ in tickets:
                finished.acquire()
                if failures:  # no one will read the other answers: stop generating them
                    raise RuntimeError(failures[0].message)
        except BaseException:
            for ticket in tickets:
                self.cancel(ticket)  # a finished one's cancel is ignored
            raise
        return [("".join(text), done) for text, done in results]

    def events(self, request: GenerationRequest) -> Iterator[Event]:
        """A blocking iterator of ``request``'s events, ending with Done or Failed; closing it early cancels."""
        box: queue.SimpleQueue[Event] = queue.SimpleQueue()
        ticket = self.submit(request, box.put)
        finished = False
        try:
            while not finished:
                event = box.get()
                finished = not isinstance(event, Delta)
                yield event
        finally:
            if not finished:
                self.cancel(ticket)

    async def aevents(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """``events`` for asyncio: the events arrive through the running loop; closing it early (a client
        gone, a task cancelled) cancels the generation."""
        loop = asyncio.get_running_loop()
        box: asyncio.Queue[Event] = asyncio.Queue()

        def sink(event: Event) -> None:
            loop.call_soon_threadsafe(box.put_nowait, event)

        ticket = self.submit(request, sink)
        finished = False
        try:
            while not finished:
                event = await box.get()
                finished = not isinstance(event, Delta)
                yield event
        finally:
            if not finished:
                self.cancel(ticket)

    # -- the worker ------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while True:
                if self._closing and not self._waiting and not self._active:
                    self._cache.clear()  # the generators and their KV caches go with the model
                    return
                if not self._waiting and not self._active:
                    self._take([self._inbox.get()])  # idle: sleep until a command, then start at once
                self._take(self._drain())
                self._drop_finished()
                while self._waiting and self._gathered():
                    young = self._young_batch()
                    ready = self._next_batch(young) if young is not None else []
                    if young is not None and not self._worth_restarting(young, ready):
                        # Back where they were (tickets are in submission order): not worth a restart.
                        self._waiting = sorted(ready + self._waiting, key=lambda item: item.ticket)
                        ready, young = [], None
                    if not ready:
                        if len(self._active) >= self.max_generators:
                            break
                        ready = self._next_batch()
                        if not ready:
                            break
                    self._start(ready, young)
                # One step of the running batch that has had the least of the worker's time: batches
                # share it evenly, a prefill counting against the batch that asked for it (after its
                # first token, so a newcomer's first token waits for no one's catching up).
                if self._active:
                    running = min(self._active, key=lambda b: b.used)
                    start = time.perf_counter()
                    self._step(running)
                    running.used += time.perf_counter() - start + running.debt
                    running.debt = 0.0
                    self._take(self._drain())  # cancels end their rows now; new requests join at the next step
        except BaseException as e:
            # Never leave a caller waiting on a dead thread: fail what is in flight, what is still in
            # the inbox, and (through _broken) every later submit.
            self._cache.clear()
            with self._count_lock:
                self._broken = f"the generation thread died: {e}"
            sinks = [item.sink for item in self._waiting]
            sinks += [row.sink for row in self._rows.values() if not row.finished]
            sinks += [command.sink for command in self._drain() if isinstance(command, Submit)]
            for sink in sinks:
                _deliver(sink, Failed(self._broken))
            raise

    def _drop_finished(self) -> None:
        """Batches whose every row has ended (cancelled, say) leave at once: they hold a generator's
        place and KV cache, and under time sharing their next step may be a while away."""
        for batch in [b for b in self._active if all(row.finished for row in b.rows)]:
            self._retire(batch)

    def _worth_restarting(self, young: _Batch, ready: list[Submit]) -> bool:
        """A restart pays when at least MERGE_JOINING requests join and the restarted prompt is no
        longer than theirs (it is prefilled again, and the joiners are padded to the longest)."""
        return len(ready) >= MERGE_JOINING and len(young.rows[0].request.ids) <= max(
            len(item.request.ids) for item in ready
        )

    def _gathered(self) -> bool:
        """Whether to start a batch of what waits now. An idle loop starts at once; while batches run,
        a new one waits until its first request is GATHER_S old (or a batch is full), so that clients
        sending together (within milliseconds, each over its own connection) share one batch rather
        than each becoming a generator of its own: every running generator takes its share of the
        worker's time."""
        if not self._active or len(self._waiting) >= self.max_batch_size:
            return True
        return time.monotonic() - self._waiting[0].at >= GATHER_S

    def _drain(self) -> list[Command]:
        commands: list[Command] = []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _take(self, commands: list) -> None:
        for command in commands:
            if isinstance(command, list):  # submit_many: requests sent together
                self._waiting.extend(command)
                continue
            if isinstance(command, Submit):
                self._waiting.append(command)
                continue
            row = self._rows.get(command.ticket)
            if row is not None and not row.finished:
                self._end(row, Done("cancelled", len(row.request.ids), row.generated))
                continue
            for i, waiting in enumerate(self._waiting):
                if waiting.ticket == command.ticket:
                    del self._waiting[i]
                    self._finish(waiting.sink, Done("cancelled", len(waiting.request.ids), 0))
                    break

    @property
    def _rows(self) -> dict[int, _Row]:
        return {row.ticket: row for batch in self._active for row in batch.rows}

    def _young_batch(self) -> _Batch | None:
        """A running batch of one greedy request that the greedy requests waiting now restart with
        (see MERGE_TOKENS): at least MERGE_JOINING of them, with its constraint."""
        if not self._waiting or self._waiting[0].request.temperature > 0:
            return None
        guidance = self._waiting[0].request.guidance
        joining = sum(item.request.temperature <= 0 and item.request.guidance == guidance for item in self._waiting)
        if joining < MERGE_JOINING:
            return None
        for batch in self._active:
            row = batch.rows[0]
            if (len(batch.rows) == 1 and row.request.temperature <= 0 and row.request.guidance == guidance
                    and not row.finished and row.generated <= MERGE_TOKENS):  # fmt: skip
                return batch
        return None

    def _next_batch(self, young: _Batch | None = None) -> list[Submit]:
        """The first waiting request and, in order, those that share its sampling settings, while
        every row's whole answer fits in the context after the batch's longest prompt (the rows share
        one length) and the KV cache of every running batch and this one (rows x their length) stays
        within max_batch_kv_bytes. The first request goes alone if need be (it was checked against
        the context) when nothing else runs; while others run, it waits for room."""
        if not self._waiting:
            return []

        def sampling(request: GenerationRequest) -> tuple:
            # Rows of one batch share their search options and their constraint.
            if request.temperature <= 0:
                return (0.0, 1.0, request.guidance)
            # A seeded request samples alone: rows of one batch draw from one random stream.
            return (request.temperature, request.top_p, request.guidance,
                    id(request) if request.seed is not None else None)  # fmt: skip

        used = sum(batch.kv_bytes for batch in self._active if batch is not young)
        key = sampling(self._waiting[0].request)
        batch: list[Submit] = []
        carried = young.rows if young is not None else []
        longest = max((len(row.request.ids) for row in carried), default=0)
        most = max((row.request.max_tokens for row in carried), default=0)
        for item in self._waiting:
            if len(carried) + len(batch) == self.max_batch_size:
                break
            request = item.request
            length = max(longest, len(request.ids)) + max(most, request.max_tokens)
            kv = used + (len(carried) + len(batch) + 1) * length * self.kv_bytes_per_token
            fits = length <= self.context_length and (not self.max_batch_kv_bytes or kv <= self.max_batch_kv_bytes)
            if sampling(request) == key and (fits or (young is None and not (batch or self._active))):
                batch.append(item)
                longest, most = max(longest, len(request.ids)), max(most, request.max_tokens)
        taken = {item.ticket for item in batch}
        self._waiting = [item for item in self._waiting if item.ticket not in taken]
        return batch

    def _start(self, batch: list[Submit], young: _Batch | None = None) -> None:
        """Start ``batch`` as a generator; with ``young``, restart that batch's row in it too (the
        young batch goes on as it was if the new generator cannot start). A lone greedy request
        takes a cached generator when one shares a prefix with it (``prompt_cache``)."""
        rows = [_Row(item.ticket, item.request, item.sink, self.tokenizer.create_stream()) for item in batch]
        if young is not None:
            rows = young.rows + rows
        longest = max(len(row.request.ids) for row in rows)
        self.batches += 1
        self.last_batch = tuple(row.ticket for row in rows)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        most = max(r.request.max_tokens for r in rows)
        max_length = min(self.context_length, longest + most)
        cacheable = self._cacheable(rows)
        if cacheable:  # room for a later request a little longer than this one, where the KV budget has it
            rounded = min(self.context_length, -(-max_length // PROMPT_CACHE_BLOCK) * PROMPT_CACHE_BLOCK)
            held = sum(b.kv_bytes for b in self._active) + sum(c.kv_bytes for c in self._cache)
            if not self.max_batch_kv_bytes or held + rounded * self.kv_bytes_per_token <= self.max_batch_kv_bytes:
                max_length = rounded  # not at the cost of a cached generator
        running = _Batch(rows, None, any(row.request.logprobs is not None for row in rows),
                         len(rows) * max_length * self.kv_bytes_per_token, max_length=max_length)  # fmt: skip
        self._active.append(running)
        try:
            ids = np.full((len(rows), longest), self.pad, dtype=np.int32)
            for i, row in enumerate(rows):
                ids[i, : len(row.request.ids)] = row.request.ids
            first = rows[0].request
            # It joins at the least time any running batch has had: no credit for having waited.
            running.used = min((b.used for b in self._active if b is not running), default=0.0)
            start = time.perf_counter()
            if not (cacheable and self._from_cache(running, ids[0])):
                self._fit_cache(running.kv_bytes)
                running.generator = start_generator(self.og, self.model, ids, max_length, first.temperature,
                                                    first.top_p, first.seed, first.guidance)  # fmt: skip
            running.debt = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - fail this batch, keep the thread serving
            if young is not None:  # the young batch's own generator is intact: it goes on alone
                running.rows = rows[len(young.rows) :]
            self._fail(running, e)
            return
        if young is not None:
            self._active.remove(young)
            young.generator = None  # its KV cache goes with it
            for row in young.rows:
                row.replay = len(row.tokens)
                row.cached = row.took = 0  # its whole prompt is computed again
            self.merges += 1

    # -- the prompt cache ------------------------------------------------------------------------

    def _cacheable(self, rows: list[_Row]) -> bool:
        """A lone greedy unconstrained request, with the prompt cache on: its generator may be
        reused by a later one (sampling draws from a stream set when a generator starts, a
        constraint's state cannot be rewound)."""
        request = rows[0].request
        return self.prompt_cache and len(rows) == 1 and request.temperature <= 0 and request.guidance is None

    def _from_cache(self, running: _Batch, ids: np.ndarray) -> bool:
        """Give ``running`` (one cacheable row) the cached generator that shares the longest prefix
        with its prompt and has room for its answer: rewound to that prefix, the rest appended.
        False when none does (or reusing it failed: it is dropped, and a fresh generator starts)."""
        row = running.rows[0]
        need = min(self.context_length, len(ids) + row.request.max_tokens)
        best, common = None, 0
        for entry in self._cache:
            if entry.max_length < need:
                continue
            # Only its prompt's positions (computed in a prefill), and at least two tokens appended:
            # the KV cache and logits are then bit for bit a fresh prefill's, so no answer changes.
            # (Measured on SmolLM2 int4: a one-token append, or an answer's positions, computed one
            # token at a time, differ in the last bits and flip a greedy token now and then.)
            n = min(len(entry.tokens), len(ids) - MIN_APPENDED)
            if n <= 0:
                continue
            differ = np.flatnonzero(entry.tokens[:n] != ids[:n])
            shared = int(differ[0]) if differ.size else n
            if entry.proven and shared < PROVEN_SHARE * _reusable(entry):
                continue  # kept for the requests that continue it
            # The longest shared start; of equal ones, the shortest generator that fits, leaving a
            # longer one to the request that needs it.
            if shared > common or (best is not None and shared == common and entry.max_length < best.max_length):
                best, common = entry, shared
        if best is not None:
            self._cache.remove(best)
            try:
                best.generator.rewind_to(common)
                best.generator.append_tokens(ids[None, common:])
                running.generator, running.kv_bytes, running.max_length = best.generator, best.kv_bytes, best.max_length
                row.cached, row.took = common, _reusable(best)
            except Exception:  # noqa: BLE001 - a generator that cannot be reused is dropped, not fatal
                best.generator = None
        self.prompt_cache_queries += len(ids)
        self.prompt_cache_hits += row.cached
        if self.on_prompt_cache is not None:
            self.on_prompt_cache(len(ids), row.cached)
        return row.cached > 0

    def _retire(self, batch: _Batch) -> None:
        """``batch`` has ended: it leaves the running ones, its generator kept in the prompt cache
        when it may be reused (beyond PROMPT_CACHE_SLOTS, the least recently used one goes, of
        those never proven if any)."""
        if batch in self._active:
            self._active.remove(batch)
        generator, batch.generator = batch.generator, None
        if generator is None or not self._cacheable(batch.rows):
            return
        tokens = np.asarray(batch.rows[0].request.ids, dtype=np.int32)
        # One it makes useless goes: a prompt it starts with, in a generator no longer than it. A
        # client repeating one prompt so keeps one place, not every place (another client's stays).
        self._cache = [c for c in self._cache if not (
            c.max_length <= batch.max_length and len(c.tokens) <= len(tokens)
            and np.array_equal(c.tokens, tokens[: len(c.tokens)]))]  # fmt: skip
        row = batch.rows[0]
        proven = row.took > 0 and row.cached >= PROVEN_SHARE * row.took
        self._cache.insert(0, _Cached(tokens, generator, batch.max_length, batch.kv_bytes, proven))
        while len(self._cache) > PROMPT_CACHE_SLOTS:
            # The least recently used of the older ones never proven goes first (a client sending a
            # new prompt each time does not push out a prompt that keeps coming back); when all are
            # proven, the least recently used (the newest always gets in: a new chat's first turn).
            fresh = [c for c in self._cache[1:] if not c.proven]
            self._cache.remove(fresh[-1] if fresh else self._cache[-1])
        self._fit_cache(0)

    def _fit_cache(self, more: int) -> None:
        """Drop cached generators, least recently used first, until the running batches', the cache's
        and ``more`` bytes of KV cache fit in max_batch_kv_bytes."""
        if not self.max_batch_kv_bytes:
            return
        running = sum(b.kv_bytes for b in self._active if b.generator is not None)
        while self._cache and running + more + sum(c.kv_bytes for c in self._cache) > self.max_batch_kv_bytes:
            self._cache.pop()

    def _step(self, batch: _Batch) -> None:
        """One token for every row of ``batch``; the batch leaves the running ones when it is done."""
        rows, generator = batch.rows, batch.generator
        try:
            if generator is not None and not generator.is_done() and not all(row.finished for row in rows):
                # The distribution the next token is drawn from (read before the step; after it, the
                # generator holds the following position's).
                logits = np.asarray(generator.get_logits()).reshape(len(rows), -1) if batch.scored else None
                generator.generate_next_token()
                for i, (row, token) in enumerate(zip(rows, generator.get_next_tokens(), strict=True)):
                    if not row.finished and row.replay:
                        self._replayed(row, int(token))
                    elif not row.finished:
                        if logits is not None and row.request.logprobs is not None and int(token) not in self.eos:
                            row.logprobs.append(self._logprob_entry(logits[i], int(token), row.request.logprobs))
                        self._token(row, int(token))
                if not generator.is_done() and not all(row.finished for row in rows):
                    return
            for row in rows:
                if not row.finished:
                    self._end(row, Done("length", len(row.request.ids), row.generated))
        except Exception as e:  # noqa: BLE001 - fail this batch, keep the thread serving
            self._fail(batch, e)
        if batch in self._active:
            self._retire(batch)

    def _fail(self, batch: _Batch, e: Exception) -> None:
        for row in batch.rows:
            if not row.finished:
                self._end(row, Failed(f"generation failed: {e}"))
        if batch in self._active:
            self._active.remove(batch)

    def _logprob_entry(self, logits: np.ndarray, token: int, top: int) -> dict:
        """OpenAI's logprobs item for ``token`` drawn from ``logits``, with the ``top`` most likely."""
        x = logits.astype(np.float64)
        lp = x - x.max()
        lp -= np.log(np.exp(lp).sum())

        def item(t: int) -> dict:
            text = self.tokenizer.decode(np.asarray([t], dtype=np.int32))
            return {"token": text, "logprob": float(lp[t]), "bytes": list(text.encode("utf-8", "replace"))}

        best = np.argpartition(-lp, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-lp[best])]
        return {**item(token), "top_logprobs": [item(int(t)) for t in best]}

    def _delta(self, row: _Row, text: str) -> Delta:
        """``text`` with the logprobs of the tokens behind it, when asked for."""
        if row.request.logprobs is None:
            return Delta(text)
        entries, row.logprobs = row.logprobs, []
        return Delta(text, entries)

    def _replayed(self, row: _Row, token: int) -> None:
        """A token of a restarted row that it had already: the same one, not sent again."""
        expected = row.tokens[len(row.tokens) - row.replay]
        row.replay -= 1
        if token != expected:  # never seen: the rows of a batch each get their lone greedy tokens
            self._end(row, Failed(f"generation diverged when batched with later requests (token {token}, "
                                  f"not {expected}); ask again"))  # fmt: skip

    def _token(self, row: _Row, token: int) -> None:
        row.generated += 1
        if row.generated <= MERGE_TOKENS:  # all a restart may decode again
            row.tokens.append(token)
        if token in self.eos:
            self._end(row, Done("stop", len(row.request.ids), row.generated))
            return
        piece = row.decoder.decode(token)  # type: ignore[attr-defined]
        row.text += piece
        stop = row.request.stop
        if stop:
            # Only a match that the new piece completes is new: search from the longest stop string's
            # length before it, so a token costs the stop strings' length, not the answer's.
            since = max(0, len(row.text) - len(piece) - max(map(len, stop)) + 1)
            row.text, found = truncate_at_stop(row.text, stop, since)
            if found:
                # OpenAI leaves the stop string out and ends the answer there: stop generating.
                self._end(row, Done("stop", len(row.request.ids), row.generated))
                return
            visible = len(row.text) - held_back(row.text, stop)
        else:
            visible = len(row.text)
        if visible > row.sent:
            if not _deliver(row.sink, self._delta(row, row.text[row.sent : visible])):
                self._end(row, Done("cancelled", len(row.request.ids), row.generated))
                return
            row.sent = visible
        if row.generated >= row.request.max_tokens:
            self._end(row, Done("length", len(row.request.ids), row.generated))

    def _end(self, row: _Row, event: Event) -> None:
        flush = row.sent < len(row.text) or row.logprobs
        if isinstance(event, Done) and event.finish_reason != "cancelled" and flush:
            _deliver(row.sink, self._delta(row, row.text[row.sent :]))  # what a possible stop string held back
            row.sent = len(row.text)
        row.finished = True
        if isinstance(event, Done) and row.cached:
            event = Done(event.finish_reason, event.prompt_tokens, event.completion_tokens, row.cached)
        self._finish(row.sink, event)

    def _finish(self, sink: Sink, event: Event) -> None:
        with self._count_lock:
            self._in_loop -= 1
        _deliver(sink, event)


def _reusable(entry: _Cached) -> int:
    """The most a request can take from ``entry``: the same prompt again still computes MIN_APPENDED."""
    return max(len(entry.tokens) - MIN_APPENDED, 1)


def _deliver(sink: Sink, event: Event) -> bool:
    """Hand ``event`` to a caller's sink; False if the sink raised. A caller's failure (an event loop
    closed under a server's request, say) must not reach the worker: it would end every batch-mate's
    answer and the thread with them."""
    try:
        sink(event)
        return True
    except Exception:  # noqa: BLE001 - the caller's own problem; it gets no more events
        return False
