"""Concurrent chat requests on one ORT GenAI model, batched by onnxruntime-genai's own ``og.Engine``.

One worker thread owns the engine: it is the only thread that calls ``create_request``,
``begin_turn``, ``cancel_turn`` and ``run`` (the engine is not documented as thread-safe), so
callers talk to it through a queue. ``submit`` hands it token ids and search options plus a sink
(a callable the worker calls with each ``Delta`` and the final ``Done`` or ``Failed``); a caller
that goes away calls ``cancel`` and the engine stops generating for it at its next step.

On CPU the engine batches statically: requests that arrive together decode as batches of 4 (the
static scheduler's fixed size in onnxruntime-genai 0.18, whatever ``engine.static_batching.max_batch_size``
says; continuous batching needs a paged KV cache, which the builder exports for CUDA and WebGPU only);
a request that arrives while a batch runs waits for it to finish (bench/README.md has the figures).
More than ``max_waiting`` requests in the engine at once are refused with ``Overloaded`` (the
server answers 503), so a flood queues no unbounded work.
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
class _Active:
    request: object
    turn_id: int
    sink: Sink
    decoder: object
    stop: list[str]
    text: str = ""
    sent: int = 0
    stopped: bool = False  # a stop string ended the answer
    cancelled: bool = False  # the caller went away


class EngineLoop:
    """The worker thread around ``og.Engine(model)``; started on first use, a daemon."""

    def __init__(self, og, model, tokenizer, eos: set[int], max_waiting: int = MAX_WAITING):
        self.og, self.model, self.tokenizer, self.eos, self.max_waiting = og, model, tokenizer, eos, max_waiting
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._tickets = itertools.count()
        self._count_lock = threading.Lock()
        self._in_engine = 0
        self._broken = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="og-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._broken:
            raise RuntimeError(self._broken)

    # -- callers' side (any thread) --------------------------------------------------------------

    def submit(self, turn: Turn, sink: Sink) -> int:
        """Queue ``turn``; its events go to ``sink`` on the worker thread. Returns a ticket for cancel."""
        with self._count_lock:
            if self._broken:
                raise RuntimeError(self._broken)
            if self._in_engine >= self.max_waiting:
                raise Overloaded(f"{self._in_engine} requests are in progress; try again shortly")
            self._in_engine += 1
        ticket = next(self._tickets)
        self._inbox.put(("submit", ticket, turn, sink))
        return ticket

    def cancel(self, ticket: int) -> None:
        self._inbox.put(("cancel", ticket, None, None))

    def answer_all(self, turns: list[Turn]) -> list[tuple[str, Done]]:
        """Every turn's whole answer and its Done, submitted together so that they decode as engine
        batches (of 4 on CPU; the rest start as a batch finishes). Raises RuntimeError
        when one fails, after the others are cancelled."""
        results: list[list] = [[[], None] for _ in turns]
        finished = threading.Semaphore(0)

        def sink_for(i: int) -> Sink:
            def sink(event: Event) -> None:
                if isinstance(event, Delta):
                    results[i][0].append(event.text)
                else:
                    results[i][1] = event
                    finished.release()

            return sink

        tickets = []
        try:
            for i, turn in enumerate(turns):
                tickets.append(self.submit(turn, sink_for(i)))
            for _ in tickets:
                finished.acquire()
        except BaseException:
            for ticket in tickets:
                self.cancel(ticket)
            raise
        failed = next((r[1] for r in results if isinstance(r[1], Failed)), None)
        if failed is not None:
            raise RuntimeError(failed.message)
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
        # og.Engine serves only the thread that created it: create it here.
        try:
            self.engine = self.og.Engine(self.model)
        except Exception as e:  # noqa: BLE001 - reported to the constructor's caller
            self._broken = f"og.Engine could not start: {e}"
            self._ready.set()
            return
        self._ready.set()
        active: dict[int, _Active] = {}
        try:
            self._work(active)
        except BaseException as e:
            # Never leave a caller waiting on a dead thread: fail what is in flight and all later submits.
            with self._count_lock:
                self._broken = f"the engine thread died: {e}"
            for state in active.values():
                state.sink(Failed(self._broken))
            raise

    def _gather(self) -> list:
        """The first command, and what else arrives within GATHER_S of it. The static engine admits
        no request into a running batch, so clients that send together (within milliseconds) must
        start together; waiting 20 ms for them costs a lone request about as much as four tokens."""
        commands = [self._inbox.get()]
        deadline = time.monotonic() + GATHER_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                commands.append(self._inbox.get(timeout=left))
            except queue.Empty:
                break
        return commands

    def _work(self, active: dict[int, _Active]) -> None:
        import numpy as np

        og = self.og
        by_request: dict[int, int] = {}
        buffer = self.engine.create_event_buffer(64)
        while True:
            # Block only when the engine has nothing to do; otherwise take what has arrived and step.
            commands = [] if self.engine.has_pending_requests() else self._gather()
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, ticket, turn, sink in commands:
                if kind == "submit":
                    try:
                        options = og.RequestOptions()
                        options.set_max_session_tokens(len(turn.ids) + turn.max_tokens)
                        request = self.engine.create_request(options=options)
                        turn_options = og.TurnOptions(request)
                        turn_options.set_max_generated_tokens(turn.max_tokens)
                        if turn.temperature > 0:
                            turn_options.set_do_sample(True)
                            turn_options.set_temperature(turn.temperature)
                            turn_options.set_top_p(turn.top_p)
                        else:
                            turn_options.set_do_sample(False)
                        turn_id = request.begin_turn(np.asarray(turn.ids, dtype=np.int32), turn_options)
                    except Exception as e:  # noqa: BLE001 - the request fails, the engine keeps serving
                        self._finish(sink, Failed(f"the engine refused the request: {e}"))
                        continue
                    active[ticket] = _Active(request, turn_id, sink, self.tokenizer.create_stream(), list(turn.stop))
                    by_request[id(request)] = ticket
                elif ticket in active:
                    state = active[ticket]
                    state.cancelled = True
                    state.request.cancel_turn(state.turn_id)  # type: ignore[attr-defined]
            if not self.engine.has_pending_requests():
                continue
            try:
                self.engine.run(buffer)
            except Exception as e:  # noqa: BLE001 - fail what is in flight, keep the thread alive
                for state in active.values():
                    self._close(state)
                    self._finish(state.sink, Failed(f"the engine failed: {e}"))
                active.clear()
                by_request.clear()
                continue
            for i in range(len(buffer)):
                event = buffer[i]
                ticket = by_request.get(id(event.request))
                if ticket is None:
                    continue
                state = active[ticket]
                flags = int(event.flags)
                if flags & int(og.EngineEventFlags.TOKEN) and not (state.stopped or state.cancelled):
                    self._token(state, int(event.token))
                if flags & int(og.EngineEventFlags.FAILED):
                    self._close(state)
                    del active[ticket], by_request[id(event.request)]
                    self._finish(state.sink, Failed(f"generation failed ({event.error_code})"))
                elif flags & int(og.EngineEventFlags.TURN_FINISHED):
                    if not state.cancelled and state.sent < len(state.text):
                        state.sink(Delta(state.text[state.sent :]))  # what a possible stop string held back
                    reason = self._reason(event.finish_reason, state)
                    self._close(state)
                    del active[ticket], by_request[id(event.request)]
                    usage = event.usage
                    self._finish(state.sink, Done(reason, int(usage.prompt_tokens), int(usage.generated_tokens)))

    def _token(self, state: _Active, token: int) -> None:
        if token in self.eos:
            return
        state.text += state.decoder.decode(token)  # type: ignore[attr-defined]
        if state.stop:
            state.text, found = truncate_at_stop(state.text, state.stop)
            if found:
                # OpenAI leaves the stop string out and ends the answer there: stop generating.
                state.stopped = True
                state.request.cancel_turn(state.turn_id)  # type: ignore[attr-defined]
                return
            visible = len(state.text) - held_back(state.text, state.stop)
        else:
            visible = len(state.text)
        if visible > state.sent:
            state.sink(Delta(state.text[state.sent : visible]))
            state.sent = visible

    def _reason(self, finish, state: _Active) -> str:
        og = self.og
        if state.cancelled:
            return "cancelled"
        if state.stopped:
            return "stop"
        if finish in (og.FinishReason.MAX_GENERATED_TOKENS, og.FinishReason.MAX_SESSION_TOKENS):
            return "length"
        return "stop"

    @staticmethod
    def _close(state: _Active) -> None:
        try:
            state.request.close()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001, S110 - closing a finished request only frees it early
            pass

    def _finish(self, sink: Sink, event: Event) -> None:
        with self._count_lock:
            self._in_engine -= 1
        sink(event)
