"""The batching loop's worker (phi3mlflow/batching.py) driven by a scripted stand-in for the ORT
GenAI generator: stop strings split across tokens, max_tokens, cancel mid-batch, a raising sink, and
the worker thread dying with every waiter told. No model."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from phi3mlflow.batching import MERGE_TOKENS, BatchLoop, Delta, Done, Failed, GenerationRequest
from phi3mlflow.errors import Overloaded

# The test of a dying worker kills its thread on purpose; pytest reports that whenever it notices.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
EOS = 0
# Token id -> text. A row's answer is the script of its prompt's first token.
VOCAB = {1: "Mad", 2: "rid", 3: ".", 4: " N", 5: "ext", 6: " x", 7: "Ro", 8: "me"}
SCRIPTS = {10: [1, 2, 3, 4, 5, EOS], 11: [7, 8, 3, EOS], 12: [6] * 50, 13: [7, 8, EOS], 14: [7, 8, EOS],
           15: [1, 2, EOS]}  # fmt: skip


class Died(BaseException):
    """What kills the worker thread (an Exception would only fail the batch)."""


class ScriptedOg:
    """The calls the loop makes on onnxruntime_genai, answering each row from SCRIPTS. ``gate``, when
    set, is waited on before every step; ``die_at`` raises Died at that step; ``step_s`` and
    ``prefill_s`` are how long a step and a prompt's append take."""

    def __init__(self):
        self.gate: threading.Event | None = None
        self.die_at: int | None = None
        self.step_s = 0.0
        self.prefill_s = 0.0
        self.appended = 0  # prompts appended so far (generators started, or reused from the prompt cache)
        self.appended_tokens: list[int] = []  # how many tokens each append computed
        self.rewinds: list[int] = []  # rewind_to's positions (the prompt cache)
        self.rewound_lengths: list[int] = []  # the max_length of each generator rewound
        self.refuse_rewind = False  # rewind_to fails
        self.refuse_batches = False  # a generator of more than one row fails to start
        self.searches: list[dict] = []
        og = self

        class GeneratorParams:
            def __init__(self, model):
                self.search: dict = {}

            def set_search_options(self, **search):
                if og.refuse_batches and search["batch_size"] > 1:
                    raise RuntimeError("scripted: no room for this batch")
                self.search = search
                og.searches.append(search)

            def set_guidance(self, kind, text):
                self.search["guidance"] = (kind, text)

        class Generator:
            def __init__(self, model, params):
                self.params, self.step, self.rows = params, 0, None

            def append_tokens(self, ids):
                if og.prefill_s:
                    threading.Event().wait(og.prefill_s)
                ids = np.asarray(ids)
                if self.rows is None:
                    self.rows = [SCRIPTS[int(row[0])] for row in ids]
                    self.prompt = 0
                self.prompt += ids.shape[1]  # after a rewind: the kept prefix and these
                og.appended += 1
                og.appended_tokens.append(int(ids.shape[1]))

            def rewind_to(self, n):
                if og.refuse_rewind:
                    raise RuntimeError("scripted: cannot rewind")
                og.rewinds.append(n)
                og.rewound_lengths.append(self.params.search["max_length"])
                self.prompt, self.step = n, 0

            def is_done(self):
                return self.prompt + self.step >= self.params.search["max_length"]

            def generate_next_token(self):
                if og.gate is not None:
                    assert og.gate.wait(10)
                if og.step_s:
                    threading.Event().wait(og.step_s)
                if og.die_at is not None and self.step == og.die_at:
                    raise Died("scripted death")
                self.step += 1

            def get_next_tokens(self):
                return [row[min(self.step - 1, len(row) - 1)] for row in self.rows]

            def get_logits(self):
                """Before a step: the scripted next token at logit 2, token 3 at 1, the rest 0."""
                logits = np.zeros((len(self.rows), 1, 16), dtype=np.float32)
                for i, row in enumerate(self.rows):
                    logits[i, 0, 3] = 1.0
                    logits[i, 0, row[min(self.step, len(row) - 1)]] = 2.0
                return logits

        self.GeneratorParams, self.Generator = GeneratorParams, Generator


class Stream:
    def decode(self, token: int) -> str:
        return VOCAB[token]


class Tokenizer:
    def create_stream(self):
        return Stream()

    def decode(self, ids) -> str:
        return "".join(VOCAB.get(int(t), "") for t in ids)


def make(og: ScriptedOg | None = None, **kw) -> tuple[BatchLoop, ScriptedOg]:
    og = og or ScriptedOg()
    return BatchLoop(og, object(), Tokenizer(), {EOS}, 99, 256, 4, **kw), og


def request(first: int, max_tokens: int = 20, stop: list[str] | None = None, temperature: float = 0.0):
    return GenerationRequest([first, 50, 51], max_tokens, temperature, 1.0, stop or [])


def collect(box: queue.SimpleQueue) -> list:
    events = [box.get(timeout=10)]
    while isinstance(events[-1], Delta):
        events.append(box.get(timeout=10))
    return events


def text(events) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


def test_answers_end_on_the_end_token_with_their_usage():
    loop, _ = make()
    [(answer, done)] = loop.complete_all([request(11)])
    assert answer == "Rome." and done == Done("stop", 3, 4)  # the end token counts, as GenAIChat counts it


def test_a_stop_string_split_across_tokens_is_cut_and_never_leaks():
    loop, _ = make()
    box: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(10, stop=[". N"]), box.put)
    events = collect(box)
    # "." could start ". N": held back, then " N" completes it; nothing of it ever reaches the caller.
    assert text(events) == "Madrid" and all(". N" not in e.text and "." not in e.text for e in events[:-1])
    assert events[-1] == Done("stop", 3, 4)


def test_held_back_text_is_flushed_when_the_answer_ends_without_the_stop_string():
    loop, _ = make()
    [(answer, done)] = loop.complete_all([request(11, stop=[". N"])])
    assert answer == "Rome." and done.finish_reason == "stop"


def test_max_tokens_ends_a_row_with_length():
    loop, _ = make()
    [(answer, done)] = loop.complete_all([request(12, max_tokens=5)])
    assert answer == " x" * 5 and done == Done("length", 3, 5)


def test_requests_sent_together_share_one_batch_and_keep_their_own_answers():
    loop, og = make()
    answers = loop.complete_all([request(10), request(11), request(13, max_tokens=2)])
    assert [a for a, _ in answers] == ["Madrid. Next", "Rome.", "Rome"]
    assert [d.finish_reason for _, d in answers] == ["stop", "stop", "length"]
    assert loop.batches == 1 and len(loop.last_batch) == 3 and og.searches[-1]["batch_size"] == 3
    assert loop.in_loop == 0


def test_greedy_and_sampled_requests_never_share_a_batch():
    loop, og = make()
    loop.complete_all([request(11), request(13, temperature=0.7)])
    assert loop.batches == 2 and {s["do_sample"] for s in og.searches} == {False, True}


def test_seeded_sampled_requests_decode_alone_from_their_seed():
    loop, og = make()
    seeded = [GenerationRequest([10, 50, 51], 20, 0.7, 1.0, [], seed=7) for _ in range(2)]
    loop.complete_all([*seeded, request(11, temperature=0.7), request(13, temperature=0.7)])
    # Two seeded rows alone each (one random stream per batch), the two unseeded ones together.
    assert loop.batches == 3 and sorted(s["batch_size"] for s in og.searches) == [1, 1, 2]
    assert [s.get("random_seed") for s in og.searches if s["batch_size"] == 1] == [7, 7]
    assert all("random_seed" not in s for s in og.searches if s["batch_size"] == 2)


def test_requests_with_different_constraints_never_share_a_batch():
    loop, og = make()
    schema = ("json_schema", '{"type": "object"}')
    other = ("json_schema", '{"type": "string"}')
    constrained = [GenerationRequest([10, 50, 51], 20, guidance=g) for g in (schema, other, schema, None)]
    loop.complete_all(constrained)
    got = sorted(repr((s["batch_size"], s.get("guidance"))) for s in og.searches)
    assert loop.batches == 3 and got == sorted(map(repr, [(1, None), (1, other), (2, schema)]))


def test_logprobs_come_with_the_text_of_their_tokens_and_the_top_alternatives():
    loop, _ = make()
    scored = GenerationRequest([10, 50, 51], 20, logprobs=2)
    events = list(loop.events(scored))
    entries = [e for d in events if isinstance(d, Delta) for e in d.logprobs]
    # One entry per generated token but the end token, in order, spelling the answer.
    assert "".join(e["token"] for e in entries) == "".join(d.text for d in events if isinstance(d, Delta))
    assert len(entries) == 5 and entries[0]["token"] == "Mad"
    expected = 2 - np.log(np.exp(2) + np.exp(1) + 14)  # softmax over 16 logits: 2, 1 and fourteen 0s
    assert entries[0]["logprob"] == pytest.approx(expected)
    assert [t["token"] for t in entries[0]["top_logprobs"]] == ["Mad", "."]
    assert entries[2]["top_logprobs"][0]["token"] == "."
    # Without logprobs asked for, the deltas carry none.
    assert all(d.logprobs is None for d in loop.events(request(11)) if isinstance(d, Delta))


def test_a_request_arriving_while_a_long_answer_decodes_does_not_wait_for_it():
    loop, og = make()
    og.step_s = 0.002
    long_box: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(12, max_tokens=200), long_box.put)  # 200 steps of " x": 0.4 s at least
    while loop.batches == 0:
        threading.Event().wait(0.001)
    short = list(loop.events(request(11)))  # "Rome." in 4 steps
    assert "".join(e.text for e in short if isinstance(e, Delta)) == "Rome."
    # The short answer ended while the long one was still decoding: it was stepped beside it (one
    # newcomer does not restart a young lone request: MERGE_JOINING).
    assert long_box.qsize() < 200 and loop.batches == 2 and loop.merges == 0
    events = collect(long_box)
    while not isinstance(events[-1], Done):
        events += collect(long_box)
    assert events[-1] == Done("length", 3, 200)


def drain(box: queue.SimpleQueue) -> list:
    events = collect(box)
    while not isinstance(events[-1], Done):
        events += collect(box)
    return events


def test_a_lone_young_request_restarts_with_a_burst_and_sends_no_token_twice():
    loop, og = make()
    og.gate = threading.Event()  # the first request prefills, then waits at its first step
    first: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(10), first.put)
    while loop.batches == 0:
        threading.Event().wait(0.001)
    later = [queue.SimpleQueue() for _ in range(2)]
    for box, prompt in zip(later, (11, 13), strict=True):
        loop.submit(request(prompt), box.put)
    threading.Event().wait(0.05)  # older than GATHER_S when the first request's step ends
    og.gate.set()
    assert text(drain(first)) == "Madrid. Next"
    assert [text(drain(box)) for box in later] == ["Rome.", "Rome"]
    # One restart: the lone first request became a row of one batch of three.
    assert loop.merges == 1 and loop.batches == 2 and len(loop.last_batch) == 3
    assert [s["batch_size"] for s in og.searches] == [1, 3]


def test_a_request_past_merge_tokens_is_not_restarted_and_a_burst_starts_beside_it():
    loop, og = make()
    og.step_s = 0.002
    long_box: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(12, max_tokens=60), long_box.put)
    while long_box.qsize() <= MERGE_TOKENS:
        threading.Event().wait(0.001)
    burst = [queue.SimpleQueue() for _ in range(2)]
    loop.submit_many([(request(11), box.put) for box in burst])
    assert [text(drain(box)) for box in burst] == ["Rome."] * 2
    assert text(drain(long_box)) == " x" * 60
    assert loop.merges == 0 and loop.batches == 2 and len(loop.last_batch) == 2


def test_a_restarted_row_whose_tokens_would_differ_fails_alone_and_its_mates_go_on():
    loop, og = make()
    og.gate = threading.Event()
    SCRIPTS[14] = [1, 2, 3, EOS]
    try:
        first: queue.SimpleQueue = queue.SimpleQueue()
        loop.submit(request(14), first.put)
        while og.appended == 0:  # its generator has read the script
            threading.Event().wait(0.001)
        SCRIPTS[14] = [7, 8, EOS]  # what the restarted generator decodes for it: not what it sent
        mates = [queue.SimpleQueue() for _ in range(2)]
        for mate in mates:
            loop.submit(request(11), mate.put)
        threading.Event().wait(0.05)
        og.gate.set()
        events = collect(first)
    finally:
        del SCRIPTS[14]
    assert text(events) == "Mad" and isinstance(events[-1], Failed) and "diverged" in events[-1].message
    assert [text(drain(mate)) for mate in mates] == ["Rome."] * 2
    assert loop.merges == 1


def lone_then_burst(loop: BatchLoop, og: ScriptedOg, lone: GenerationRequest, box: queue.SimpleQueue,
                    burst: int = 2) -> list[queue.SimpleQueue]:  # fmt: skip
    """``lone`` starts alone and waits at its first step; ``burst`` requests for "Rome." arrive
    together and are older than GATHER_S when the gate opens. Returns the burst's boxes."""
    og.gate = threading.Event()
    loop.submit(lone, box.put)
    while og.appended == 0:
        threading.Event().wait(0.001)
    mates = [queue.SimpleQueue() for _ in range(burst)]
    loop.submit_many([(request(11), mate.put) for mate in mates])
    threading.Event().wait(0.05)
    og.gate.set()
    return mates


def test_a_restart_whose_batch_cannot_start_leaves_the_young_request_decoding():
    loop, og = make()
    og.refuse_batches = True
    first: queue.SimpleQueue = queue.SimpleQueue()
    mates = lone_then_burst(loop, og, request(10), first)
    # The batch of three failed to start: its newcomers are told; the first request goes on alone.
    assert all(isinstance(collect(box)[-1], Failed) for box in mates)
    assert text(drain(first)) == "Madrid. Next" and loop.merges == 0


def test_no_restart_for_one_joiner_that_fits_nor_for_a_prompt_longer_than_the_joiners():
    # The KV budget holds two rows of 3 + 20 tokens: of two joiners only one fits beside the first.
    loop, og = make(kv_bytes_per_token=1, max_batch_kv_bytes=46)
    first: queue.SimpleQueue = queue.SimpleQueue()
    mates = lone_then_burst(loop, og, request(10), first)
    assert text(drain(first)) == "Madrid. Next"
    assert [text(drain(box)) for box in mates] == ["Rome."] * 2
    assert loop.merges == 0
    # A lone request with a longer prompt than the burst's is not prefilled again for it.
    loop, og = make()
    mates = lone_then_burst(loop, og, GenerationRequest([10, *range(50, 80)], 20), first)
    assert text(drain(first)) == "Madrid. Next" and loop.merges == 0
    assert [text(drain(box)) for box in mates] == ["Rome."] * 2


def test_a_cancelled_batch_leaves_at_once_though_its_turn_is_far():
    loop, og = make(max_generators=2)
    og.step_s = 0.001
    long_box: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(12, max_tokens=250), long_box.put)
    while long_box.qsize() < 5:
        threading.Event().wait(0.001)
    og.prefill_s = 1.0  # owed after its first token: the long answer's next second is its own
    late_box: queue.SimpleQueue = queue.SimpleQueue()
    ticket = loop.submit(request(12, max_tokens=250), late_box.put)
    assert isinstance(late_box.get(timeout=10), Delta)
    og.prefill_s = 0.0
    loop.cancel(ticket)
    deadline = time.monotonic() + 0.5
    while len(loop._active) > 1 and time.monotonic() < deadline:
        threading.Event().wait(0.001)
    assert len(loop._active) == 1  # not held until its turn a second away
    drain(long_box)


def test_a_newcomer_s_prefill_counts_against_it_after_its_first_token():
    """Batches share the worker's time: a request whose prompt took 100 ms to append gets its first
    token at once, then the running answer catches up on those 100 ms before its second token (in
    turn, it would be one step each)."""
    loop, og = make()
    og.step_s = 0.001
    order: list[str] = []
    long_box: queue.SimpleQueue = queue.SimpleQueue()

    def sink_for(name: str, box: queue.SimpleQueue):
        def sink(event) -> None:
            if isinstance(event, Delta):
                order.append(name)
            box.put(event)

        return sink

    loop.submit(request(12, max_tokens=250), sink_for("long", long_box))
    while long_box.qsize() < 5:
        threading.Event().wait(0.001)
    og.prefill_s = 0.1
    late_box: queue.SimpleQueue = queue.SimpleQueue()
    order.append("submitted")
    loop.submit(request(11), sink_for("late", late_box))
    assert text(drain(late_box)) == "Rome."
    og.prefill_s = 0.0
    drain(long_box)
    first, second = [i for i, name in enumerate(order) if name == "late"][:2]
    # Its first token came at its turn: after the steps of its GATHER_S wait (20 of 1 ms at most),
    # not after the 100 it then owed ...
    assert first - order.index("submitted") - 1 <= 30, order[order.index("submitted") : first + 1]
    # ... and before its second, the running answer had several steps (the 100 ms it waited; 5 even
    # if a loaded machine stretched each 1 ms step to 20).
    assert second - first - 1 >= 5, order[first : second + 1]


def test_running_batches_share_one_kv_budget():
    # Each batch may grow to 3 + 20 tokens x 1 byte: the budget holds two one-row batches, not three.
    loop, og = make(kv_bytes_per_token=1, max_batch_kv_bytes=46)
    og.step_s = 0.005
    running: list[int] = []
    loop.on_batch = lambda size: running.append(len(loop._active) + 1)
    boxes = [queue.SimpleQueue() for _ in range(3)]
    for seed, box in enumerate(boxes):
        # Seeded: each samples alone (one batch draws from one random stream), so none share a batch
        # however the three bunch up on a loaded machine (and sampled ones never restart: MERGE_TOKENS).
        loop.submit(replace(request(12, max_tokens=20, temperature=0.5), seed=seed), box.put)
        threading.Event().wait(0.02)
    for box in boxes:
        events = collect(box)
        while not isinstance(events[-1], Done):
            events += collect(box)
    # Three batches, never more than two running at once: the third waited for room.
    assert loop.batches == 3 and max(running) == 2 and running[:2] == [1, 2]


def test_a_request_cancelled_mid_batch_gets_one_cancelled_and_its_mate_goes_on():
    og = ScriptedOg()
    og.gate, og.step_s = threading.Event(), 0.01
    loop, _ = make(og)
    long_box, short_box = queue.SimpleQueue(), queue.SimpleQueue()
    doomed = loop.submit(request(12, max_tokens=40), long_box.put)
    loop.submit(request(10), short_box.put)
    og.gate.set()
    assert isinstance(long_box.get(timeout=10), Delta)  # it is decoding
    loop.cancel(doomed)
    events = collect(long_box)
    assert events[-1].finish_reason == "cancelled" and 0 < events[-1].completion_tokens < 40
    assert text(collect(short_box)) == "Madrid. Next"
    with pytest.raises(queue.Empty):
        long_box.get(timeout=0.2)  # nothing after the cancelled Done
    assert loop.in_loop == 0


def test_a_sink_that_raises_ends_only_its_own_answer():
    loop, _ = make()

    def broken(event):
        raise RuntimeError("Event loop is closed")

    good: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(request(12, max_tokens=10), broken)
    loop.submit(request(11), good.put)
    assert text(collect(good)) == "Rome."
    assert loop.complete_all([request(13)])[0][0] == "Rome" and loop.in_loop == 0


def test_a_dying_worker_tells_every_waiter_and_refuses_later_requests():
    og = ScriptedOg()
    og.gate, og.die_at = threading.Event(), 2
    loop, _ = make(og)
    running, queued = queue.SimpleQueue(), queue.SimpleQueue()
    loop.submit(request(12, max_tokens=40), running.put)
    loop.submit(request(11, temperature=0.5), queued.put)  # waits for its own batch
    og.gate.set()
    assert isinstance(collect(running)[-1], Failed)
    failed = collect(queued)[-1]
    assert isinstance(failed, Failed) and "the generation thread died" in failed.message
    with pytest.raises(RuntimeError, match="the generation thread died"):
        loop.submit(request(11), lambda e: None)


def test_beyond_max_waiting_a_request_is_overloaded():
    og = ScriptedOg()
    og.gate = threading.Event()
    loop, _ = make(og, max_waiting=2)
    loop.submit(request(12, max_tokens=5), lambda e: None)
    loop.submit(request(12, max_tokens=5), lambda e: None)
    with pytest.raises(Overloaded):
        loop.submit(request(11), lambda e: None)
    og.gate.set()


def test_the_async_pump_yields_the_same_events_and_cancels_when_closed():
    import asyncio

    loop, og = make()

    async def whole():
        return [e async for e in loop.aevents(request(10))]

    events = asyncio.run(whole())
    assert text(events) == "Madrid. Next" and events[-1].finish_reason == "stop"
    og.gate = threading.Event()

    async def leave_early():
        events = loop.aevents(request(12, max_tokens=40))
        og.gate.set()
        first = await anext(events)
        await events.aclose()  # the client went away
        return first

    assert isinstance(asyncio.run(leave_early()), Delta)
    for _ in range(100):
        if loop.in_loop == 0:
            break
        threading.Event().wait(0.02)
    assert loop.in_loop == 0  # the cancel reached the worker
    assert [e for e in loop.events(request(13))][-1].finish_reason == "stop"
