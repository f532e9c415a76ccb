"""The batching loop's prompt cache (phi3mlflow/batching.py, ``prompt_cache``): a lone greedy request
whose prompt starts as a recent one's did takes that request's finished generator, rewound to the
shared prefix, and appends only the rest. Driven by the scripted stand-in for ORT GenAI of
tests/unit/test_batching_worker.py; that the KV cache it keeps gives the same answers as a fresh
prefill on the real model is tests/integration/test_serve.py's and bench/README.md's."""

from __future__ import annotations

import queue
from dataclasses import replace

from phi3mlflow.batching import MIN_APPENDED, PROMPT_CACHE_BLOCK, PROMPT_CACHE_SLOTS, Done, GenerationRequest
from tests.unit.test_batching_worker import collect, make, text

# A system prompt of 6 tokens, then the question's.
SYSTEM = [11, 40, 41, 42, 43, 44]


def ask(loop, ids: list[int], max_tokens: int = 20, **kw) -> tuple[str, Done]:
    box: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(GenerationRequest(ids, max_tokens, **kw), box.put)
    events = collect(box)
    return text(events), events[-1]


def cached_loop(**kw):
    return make(prompt_cache=True, **kw)


def test_a_shared_prompt_start_is_rewound_to_and_only_the_rest_is_computed():
    loop, og = cached_loop()
    assert ask(loop, SYSTEM + [50, 51]) == ("Rome.", Done("stop", 8, 4))
    answer, done = ask(loop, SYSTEM + [52, 53, 54])
    # The second prompt's 6 shared tokens come from the first one's generator: 3 are computed.
    assert og.rewinds == [6] and og.appended_tokens == [8, 3] and og.appended == 2
    assert answer == "Rome." and done == Done("stop", 9, 4, cached_tokens=6)
    assert (loop.prompt_cache_queries, loop.prompt_cache_hits) == (8 + 9, 6)


def test_a_repeated_prompt_still_computes_its_last_tokens():
    # One token appended alone goes through other kernels than a prefill (other rounding on the real
    # model): a repeated prompt keeps MIN_APPENDED tokens to compute.
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51])
    answer, done = ask(loop, SYSTEM + [50, 51])
    assert og.appended_tokens == [8, MIN_APPENDED] and done.cached_tokens == 8 - MIN_APPENDED
    assert answer == "Rome."


def test_only_the_cached_prompt_is_reused_not_its_answer():
    # The next turn of a chat repeats the first prompt and its answer: only the prompt's positions
    # (computed in a prefill) are taken; the answer's were computed a token at a time.
    loop, og = cached_loop()
    first = SYSTEM + [50, 51]
    ask(loop, first)
    _, done = ask(loop, first + [7, 8, 3, 60, 61])
    assert og.rewinds == [len(first)] and done.cached_tokens == len(first)


def test_the_same_answers_with_the_cache_as_without():
    prompts = [SYSTEM + [50, 51], SYSTEM + [52], [10, 40, 41, 50], SYSTEM + [53, 54, 55], [10, 40, 41, 52, 53]]
    answers = {}
    for on in (False, True):
        loop, og = make(prompt_cache=on)
        answers[on] = [ask(loop, ids, max_tokens=3 + i) for i, ids in enumerate(prompts)]
        if on:
            assert og.rewinds  # the cache was used
    assert [(a, replace(d, cached_tokens=0)) for a, d in answers[True]] == answers[False]


def test_what_is_never_taken_from_the_cache():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51])
    # Sampled (its random stream is the generator's), constrained (its parser state is), or too long
    # for the cached generator's length: a fresh generator each.
    ask(loop, SYSTEM + [52, 53], temperature=0.7)
    ask(loop, SYSTEM + [52, 53], guidance=("regex", "R.*"))
    ask(loop, SYSTEM + [52, 53], max_tokens=250)
    assert og.rewinds == [] and og.appended_tokens == [8, 8, 8, 8]
    # The cache off: never.
    loop, og = make()
    ask(loop, SYSTEM + [50, 51])
    assert ask(loop, SYSTEM + [52, 53])[1].cached_tokens == 0 and og.rewinds == []


def test_batches_of_several_requests_are_neither_cached_nor_served_from_it():
    loop, og = cached_loop()
    box: queue.SimpleQueue = queue.SimpleQueue()
    boxes = [queue.SimpleQueue() for _ in range(2)]
    loop.submit_many([(GenerationRequest(SYSTEM + [50 + i], 20), b.put) for i, b in enumerate(boxes)])
    assert all(text(collect(b)) == "Rome." for b in boxes) and loop.last_batch == (0, 1)
    loop.submit(GenerationRequest(SYSTEM + [55, 56], 20), box.put)
    assert collect(box)[-1].cached_tokens == 0 and og.rewinds == []


def test_a_cacheable_generator_gets_room_for_a_longer_follow_up():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51], max_tokens=20)
    assert og.searches[-1]["max_length"] == PROMPT_CACHE_BLOCK  # 8 + 20, rounded up
    # A longer prompt with more tokens still fits in it.
    assert ask(loop, SYSTEM + [52, 53, 54, 55], max_tokens=60)[1].cached_tokens == 6
    loop, og = make()  # without the cache, the length asked for
    ask(loop, SYSTEM + [50, 51], max_tokens=20)
    assert og.searches[-1]["max_length"] == 28


def test_the_least_recently_used_generator_goes_beyond_the_slots():
    loop, og = cached_loop()
    firsts = [10, 11, 12, 13, 14, 15][: PROMPT_CACHE_SLOTS + 1]
    for first in firsts:
        ask(loop, [first, 40, 41, 42], max_tokens=4)
    assert ask(loop, [firsts[0], 40, 41, 43], max_tokens=4)[1].cached_tokens == 0  # dropped
    assert ask(loop, [firsts[-1], 40, 41, 43], max_tokens=4)[1].cached_tokens == 4 - MIN_APPENDED


def test_cached_generators_give_way_to_the_kv_budget():
    for budget, kept in ((300, 0), (600, 6)):
        # 1 byte a token: the cached generator of SYSTEM's request holds 128; a request of 200
        # tokens (256 with room) needs it under a budget of 300, not of 600.
        loop, og = cached_loop(kv_bytes_per_token=1, max_batch_kv_bytes=budget)
        ask(loop, SYSTEM + [50, 51], max_tokens=4)
        assert ask(loop, [12, *range(60, 159)], max_tokens=100)[1].finish_reason == "length"
        assert ask(loop, SYSTEM + [52, 53], max_tokens=4)[1].cached_tokens == kept, budget


def test_a_generator_that_cannot_be_rewound_is_dropped_and_the_request_served_fresh():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51])
    og.refuse_rewind = True
    answer, done = ask(loop, SYSTEM + [52, 53])
    assert answer == "Rome." and done == Done("stop", 8, 4) and og.appended_tokens == [8, 8]


def test_a_prompt_cached_again_in_a_longer_generator_replaces_its_shorter_one():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51], max_tokens=4)
    other = [10, 40, 41, 42]
    ask(loop, other, max_tokens=4)  # a generator of 128
    for first in [12, 13, 14, 15][: PROMPT_CACHE_SLOTS - 2]:  # the cache is full
        ask(loop, [first, 70, 71, 72], max_tokens=4)
    ask(loop, other, max_tokens=200)  # does not fit in it: a fresh one of 256, which replaces it
    # So the first prompt's generator kept its place.
    assert ask(loop, SYSTEM + [52, 53], max_tokens=4)[1].cached_tokens == 6


def test_of_equal_shared_starts_the_shortest_generator_that_fits_is_taken():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51], max_tokens=4)  # 128
    ask(loop, SYSTEM + [60, 61], max_tokens=200)  # does not fit in it: 256, the most recent
    # Both share SYSTEM with the next one: it takes the 128, leaving the 256 to a long answer.
    assert ask(loop, SYSTEM + [70, 71], max_tokens=4)[1].cached_tokens == 6
    assert og.rewound_lengths == [128]


def test_a_prompt_that_comes_back_outlasts_a_stream_of_new_ones():
    loop, og = cached_loop()
    ask(loop, SYSTEM + [50, 51], max_tokens=4)
    assert ask(loop, SYSTEM + [52, 53], max_tokens=4)[1].cached_tokens == 6  # it came back: kept first
    # Another client, a new prompt each time, more of them than the cache has places.
    for first in (10, 12, 13, 14, 15)[: PROMPT_CACHE_SLOTS + 1]:
        ask(loop, [first, 60, 61, 62, 63], max_tokens=4)
    assert ask(loop, SYSTEM + [54, 55], max_tokens=4)[1].cached_tokens == 6


def test_a_proven_prompt_is_not_taken_for_a_shared_template_opening():
    loop, og = cached_loop()
    opening = [11, 40, 41]  # what a chat template puts before every conversation
    conversation = opening + list(range(50, 58))
    ask(loop, conversation)
    assert ask(loop, conversation)[1].cached_tokens == len(conversation) - MIN_APPENDED  # it comes back
    # Another client's prompt shares only the opening: it starts fresh and leaves that one be.
    assert ask(loop, opening + [60, 61, 62, 63])[1].cached_tokens == 0
    assert ask(loop, conversation)[1].cached_tokens == len(conversation) - MIN_APPENDED


def test_a_new_conversation_gets_a_place_when_every_place_is_proven():
    loop, og = cached_loop()
    for first in (10, 12, 13, 14)[:PROMPT_CACHE_SLOTS]:
        for _ in range(2):  # each comes back: proven
            ask(loop, [first, 40, 41, 42, 43, 44], max_tokens=4)
    new = [15, 40, 41, 42, 43]
    ask(loop, new, max_tokens=4)  # in, in place of the least recently used proven one
    assert ask(loop, new, max_tokens=4)[1].cached_tokens == len(new) - MIN_APPENDED
    assert ask(loop, [14, 40, 41, 42, 43, 44], max_tokens=4)[1].cached_tokens == 4  # the newest proven stayed


def test_a_request_from_the_cache_restarted_with_a_burst_reports_no_cached_tokens():
    import threading

    loop, og = cached_loop()
    ask(loop, [10, 40, 41, 42, 43])
    og.gate = threading.Event()  # the next request takes that generator, then waits at its first step
    young: queue.SimpleQueue = queue.SimpleQueue()
    loop.submit(GenerationRequest([10, 40, 41, 42, 44], 20), young.put)
    while not og.rewinds:
        threading.Event().wait(0.001)
    later = [queue.SimpleQueue() for _ in range(2)]
    for box in later:
        loop.submit(GenerationRequest([11, 50, 51, 52, 53, 54], 20), box.put)
    threading.Event().wait(0.05)  # older than GATHER_S when the young request's step ends
    og.gate.set()
    events = collect(young)
    # Restarted with the burst, its whole prompt was computed again: nothing came from the cache.
    assert loop.merges == 1 and text(events) == "Madrid. Next" and events[-1].cached_tokens == 0
