"""Concurrent generation on one ORT GenAI model: requests that arrive together decode as one batch.

One worker thread owns generation. Callers talk to it through a queue: ``submit`` hands it a
``Turn`` (token ids and search options) plus a sink (a callable the worker calls with each
``Delta`` and the final ``Done`` or ``Failed``); a caller that goes away calls ``cancel`` and gets
one last ``Done("cancelled")``, then nothing. A sink that raises ends its own request only (as if
cancelled); its batch-mates go on.

The worker takes what is waiting (after a first request, what else arrives within ``GATHER_S``) and
decodes up to ``max_batch_size`` requests with the same sampling settings as one ORT GenAI generator
batch: prompts right-padded with the model's pad token, as ``Tokenizer.encode_batch`` pads them, so
each row's greedy tokens are the ones it gets alone (measured: 132 of 132 real questions). A
request that arrives while a batch runs waits for it to finish; a batch ends when every row has
(end token, its own ``max_tokens``, a stop string, or its caller gone). og.Engine is not used: on
CPU its static scheduler batches a fixed 4 requests whatever ``max_batch_size`` says (0.18), and
its continuous batching needs a paged-attention export the builder makes only for CUDA and WebGPU;
bench/README.md has the measurements. More than ``max_waiting`` requests in the loop at once are
refused with ``Overloaded`` (the server answers 503), so a flood queues no unbounded work.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from phi3mlflow.openai_chat import held_back, truncate_at_stop

MAX_WAITING = 64
GATHER_S = 0.02


class Overloaded(RuntimeError):
    """More requests than the engine takes at once; try again later."""


@dataclass(frozen=True)
class Turn:
    """What one request asks the engine for."""

    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" or "length" (OpenAI's), "cancelled" when the caller cancelled
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Done | Failed
Sink = Callable[[Event], None]


@dataclass
class _Row:
    """One request in the running batch."""

    ticket: int
    turn: Turn
    sink: Sink
    decoder: object
    text: str = ""
    sent: int = 0
    generated: int = 0
    finished: bool = False


class BatchLoop:
    """The worker thread around one ORT GenAI model; a daemon, started with the object."""

    def __init__(self, og, model, tokenizer, eos: set[int], pad: int, context_length: int, max_batch_size: int,
                 kv_bytes_per_token: int = 0, max_batch_kv_bytes: int = 0, max_waiting: int = MAX_WAITING):  # fmt: skip
        self.og, self.model, self.tokenizer, self.eos, self.pad = og, model, tokenizer, eos, pad
        self.context_length, self.max_batch_size, self.max_waiting = context_length, max_batch_size, max_waiting
        self.kv_bytes_per_token, self.max_batch_kv_bytes = kv_bytes_per_token, max_batch_kv_bytes
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets = itertools.count()
        self._count_lock = threading.Lock()
        self._in_loop = 0
        self._broken = ""
        self._waiting: list[tuple[int, Turn, Sink]] = []
        self._rows: dict[int, _Row] = {}
        self._thread = threading.Thread(target=self._main, name="og-batches", daemon=True)
        self._thread.start()

    # -- callers' side (any thread) --------------------------------------------------------------

    def submit(self, turn: Turn, sink: Sink) -> int:
        """Queue ``turn``; its events go to ``sink`` on the worker thread. Returns a ticket for cancel."""
        with self._count_lock:
            if self._broken:
                raise RuntimeError(self._broken)
            if self._in_loop >= self.max_waiting:
                raise Overloaded(f"{self._in_loop} requests are in progress; try again shortly")
            self._in_loop += 1
        ticket = next(self._tickets)
        self._inbox.put(("submit", ticket, turn, sink))
        return ticket

    def cancel(self, ticket: int) -> None:
        self._inbox.put(("cancel", ticket, None, None))

    def answer_all(self, turns: list[Turn]) -> list[tuple[str, Done]]:
        """Every turn's whole answer and its Done, submitted together so that they decode as batches
        (of up to max_batch_size, in the order given; the rest start as a batch finishes). Raises
        RuntimeError when one fails, after the others are cancelled."""
        results: list[list] = [[[], None] for _ in turns]
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

        tickets = []
        try:
            for i, turn in enumerate(turns):
                tickets.append(self.submit(turn, sink_for(i)))
            for _ in tickets:
                finished.acquire()
                if failures:  # no one will read the other answers: stop generating them
                    raise RuntimeError(failures[0].message)
        except BaseException:
            for ticket in tickets:
                self.cancel(ticket)  # a finished one's cancel is ignored
            raise
        return [("".join(text), done) for text, done in results]

    def events(self, turn: Turn) -> Iterator[Event]:
        """A blocking iterator of ``turn``'s events, ending with Done or Failed; closing it early cancels."""
        box: queue.SimpleQueue = queue.SimpleQueue()
        ticket = self.submit(turn, box.put)
        finished = False
        try:
            while not finished:
                event = box.get()
                finished = not isinstance(event, Delta)
                yield event
        finally:
            if not finished:
                self.cancel(ticket)

    # -- the worker ------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while True:
                if not self._waiting:
                    self._take(self._gather())
                self._take(self._drain())
                batch = self._next_batch()
                if batch:
                    self._run(batch)
        except BaseException as e:
            # Never leave a caller waiting on a dead thread: fail what is in flight, what is still in
            # the inbox, and (through _broken) every later submit.
            with self._count_lock:
                self._broken = f"the generation thread died: {e}"
            sinks = [sink for _, _, sink in self._waiting]
            sinks += [row.sink for row in self._rows.values() if not row.finished]
            sinks += [sink for kind, _, _, sink in self._drain() if kind == "submit"]
            for sink in sinks:
                _deliver(sink, Failed(self._broken))
            raise

    def _gather(self) -> list:
        """The first command, and what else arrives within GATHER_S of it. A batch admits no request
        once it runs, so clients that send together (within milliseconds) must start together;
        waiting 20 ms for them costs a lone request about as much as four tokens."""
        commands = [self._inbox.get()]
        deadline = time.monotonic() + GATHER_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                commands.append(self._inbox.get(timeout=left))
            except queue.Empty:
                break
        return commands

    def _drain(self) -> list:
        commands = []
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _take(self, commands: list) -> None:
        for kind, ticket, turn, sink in commands:
            if kind == "submit":
                self._waiting.append((ticket, turn, sink))
            elif ticket in self._rows and not self._rows[ticket].finished:
                row = self._rows[ticket]
                self._end(row, Done("cancelled", len(row.turn.ids), row.generated))
            else:
                for i, (waiting, turn, sink) in enumerate(self._waiting):
                    if waiting == ticket:
                        del self._waiting[i]
                        self._finish(sink, Done("cancelled", len(turn.ids), 0))
                        break

    def _next_batch(self) -> list[tuple[int, Turn, Sink]]:
        """The first waiting request and, in order, those that share its sampling settings, while
        every row's whole answer fits in the context after the batch's longest prompt (the rows share
        one length) and the batch's KV cache (rows x that length) stays within max_batch_kv_bytes.
        The first request always goes, alone if need be: it was checked against the context."""
        if not self._waiting:
            return []

        def sampling(turn: Turn) -> tuple:
            return (turn.temperature, turn.top_p) if turn.temperature > 0 else (0.0, 1.0)

        key = sampling(self._waiting[0][1])
        batch: list[tuple[int, Turn, Sink]] = []
        longest = most = 0
        for item in self._waiting:
            if len(batch) == self.max_batch_size:
                break
            turn = item[1]
            length = max(longest, len(turn.ids)) + max(most, turn.max_tokens)
            kv = (len(batch) + 1) * length * self.kv_bytes_per_token
            fits = length <= self.context_length and (not self.max_batch_kv_bytes or kv <= self.max_batch_kv_bytes)
            if sampling(turn) == key and (fits or not batch):
                batch.append(item)
                longest, most = max(longest, len(turn.ids)), max(most, turn.max_tokens)
        taken = {ticket for ticket, _, _ in batch}
        self._waiting = [item for item in self._waiting if item[0] not in taken]
        return batch

    def _run(self, batch: list[tuple[int, Turn, Sink]]) -> None:
        import numpy as np

        og = self.og
        longest = max(len(turn.ids) for _, turn, _ in batch)
        rows = [_Row(ticket, turn, sink, self.tokenizer.create_stream()) for ticket, turn, sink in batch]
        self._rows = {row.ticket: row for row in rows}
        try:
            ids = np.full((len(rows), longest), self.pad, dtype=np.int32)
            for i, row in enumerate(rows):
                ids[i, : len(row.turn.ids)] = row.turn.ids
            first = rows[0].turn
            search: dict = {"max_length": min(self.context_length, longest + max(r.turn.max_tokens for r in rows)),
                            "batch_size": len(rows)}  # fmt: skip
            if first.temperature > 0:
                search.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
            else:
                search.update(do_sample=False)
            params = og.GeneratorParams(self.model)
            params.set_search_options(**search)
            generator = og.Generator(self.model, params)
            generator.append_tokens(ids)
            while not generator.is_done():
                generator.generate_next_token()
                for row, token in zip(rows, generator.get_next_tokens(), strict=True):
                    if not row.finished:
                        self._token(row, int(token))
                self._take(self._drain())  # cancels end their rows now; new requests wait for the next batch
                if all(row.finished for row in rows):
                    break
            for row in rows:
                if not row.finished:
                    self._end(row, Done("length", len(row.turn.ids), row.generated))
        except Exception as e:  # noqa: BLE001 - fail this batch, keep the thread serving
            for row in rows:
                if not row.finished:
                    self._end(row, Failed(f"generation failed: {e}"))
        # Not in a finally: if the thread itself dies, _main fails these rows' callers.
        self._rows = {}

    def _token(self, row: _Row, token: int) -> None:
        row.generated += 1
        if token in self.eos:
            self._end(row, Done("stop", len(row.turn.ids), row.generated))
            return
        row.text += row.decoder.decode(token)  # type: ignore[attr-defined]
        stop = row.turn.stop
        if stop:
            row.text, found = truncate_at_stop(row.text, stop)
            if found:
                # OpenAI leaves the stop string out and ends the answer there: stop generating.
                self._end(row, Done("stop", len(row.turn.ids), row.generated))
                return
            visible = len(row.text) - held_back(row.text, stop)
        else:
            visible = len(row.text)
        if visible > row.sent:
            if not _deliver(row.sink, Delta(row.text[row.sent : visible])):
                self._end(row, Done("cancelled", len(row.turn.ids), row.generated))
                return
            row.sent = visible
        if row.generated >= row.turn.max_tokens:
            self._end(row, Done("length", len(row.turn.ids), row.generated))

    def _end(self, row: _Row, event: Event) -> None:
        if isinstance(event, Done) and event.finish_reason != "cancelled" and row.sent < len(row.text):
            _deliver(row.sink, Delta(row.text[row.sent :]))  # what a possible stop string held back
            row.sent = len(row.text)
        row.finished = True
        self._finish(row.sink, event)

    def _finish(self, sink: Sink, event: Event) -> None:
        with self._count_lock:
            self._in_loop -= 1
        _deliver(sink, event)


def _deliver(sink: Sink, event: Event) -> bool:
    """Hand ``event`` to a caller's sink; False if the sink raised. A caller's failure (an event loop
    closed under a server's request, say) must not reach the worker: it would end every batch-mate's
    answer and the thread with them."""
    try:
        sink(event)
        return True
    except Exception:  # noqa: BLE001 - the caller's own problem; it gets no more events
        return False
