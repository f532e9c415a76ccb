"""Which waiting requests the batching loop decodes together (phi3mlflow/batching.py), without a model:
the rules that keep a batch's answers each request's own and its KV cache bounded."""

from __future__ import annotations

from phi3mlflow.batching import BatchLoop, Cancel, Done, GenerationRequest, Submit


def loop(context=100, max_batch_size=4, kv_bytes_per_token=0, max_batch_kv_bytes=0) -> BatchLoop:
    # No model: the worker thread waits on its inbox, which these tests never fill.
    return BatchLoop(None, None, None, {0}, 0, context, max_batch_size, kv_bytes_per_token, max_batch_kv_bytes)


def waiting(b: BatchLoop, *turns: GenerationRequest) -> list:
    events: list = []
    b._take([Submit(i, turn, events.append) for i, turn in enumerate(turns)])
    return events


def tickets(batch) -> list[int]:
    return [item.ticket for item in batch]


def test_requests_go_in_order_up_to_the_batch_size():
    b = loop(max_batch_size=3)
    waiting(b, *[GenerationRequest([1] * (5 + i), 10) for i in range(5)])
    assert tickets(b._next_batch()) == [0, 1, 2]
    assert tickets(b._next_batch()) == [3, 4]
    assert b._next_batch() == []


def test_a_request_with_other_sampling_settings_waits_for_its_own_batch():
    b = loop()
    R = GenerationRequest
    waiting(
        b, R([1] * 5, 10), R([1] * 5, 10, temperature=0.7), R([1] * 5, 10, top_p=0.5), R([1] * 5, 10, temperature=0.7)
    )
    # Greedy ignores top_p: the first and third decode alike.
    assert tickets(b._next_batch()) == [0, 2]
    assert tickets(b._next_batch()) == [1, 3]


def test_rows_share_the_longest_prompt_so_every_answer_must_still_fit_the_context():
    b = loop(context=100)
    waiting(b, GenerationRequest([1] * 10, 80), GenerationRequest([1] * 60, 30), GenerationRequest([1] * 15, 20))
    # 60 prompt tokens + 80 new ones would pass the context: the second waits, the third joins.
    assert tickets(b._next_batch()) == [0, 2]
    assert tickets(b._next_batch()) == [1]


def test_the_kv_cache_of_a_batch_stays_within_its_budget_and_the_first_request_always_goes():
    b = loop(context=1000, max_batch_size=8, kv_bytes_per_token=1, max_batch_kv_bytes=300)
    waiting(b, *[GenerationRequest([1] * 20, 80) for _ in range(4)])
    assert tickets(b._next_batch()) == [0, 1, 2]  # 3 rows x 100 tokens
    b = loop(context=1000, kv_bytes_per_token=1, max_batch_kv_bytes=50)
    waiting(b, GenerationRequest([1] * 20, 80), GenerationRequest([1] * 5, 5))
    assert tickets(b._next_batch()) == [0]  # over the budget alone, but it fits the context
    assert tickets(b._next_batch()) == [1]


def test_a_waiting_request_cancelled_ends_at_once_and_never_decodes():
    b = loop()
    events = waiting(b, GenerationRequest([1] * 5, 10), GenerationRequest([1] * 7, 10))
    b._in_loop = 2
    b._take([Cancel(1)])
    assert events == [Done("cancelled", 7, 0)]
    assert tickets(b._next_batch()) == [0]
