"""The answering loop: every question asked of one candidate, in requests of its batch size,
with progress, and the wall-time figures batched answering needs (a batch's questions share its time)."""

from __future__ import annotations

import sys

from phi3mlflow.evaluation.callers import Answer
from phi3mlflow.progress import Progress


def ask_all(
    caller, questions: list[str], max_new_tokens: int, temperature: float, batch_size: int | None = None
) -> list[Answer]:
    """Ask every question, in requests of ``batch_size`` questions (default: the caller's; the ONNX
    model takes batches, the chat model one at a time), with progress (questions done, rate, time
    left and tokens/s: a bar on a terminal, plain lines elsewhere) and a line with the totals when
    the model is done. tokens/s is the real throughput,
    generated tokens over the wall time of the requests."""
    size = batch_size or caller.batch_size(max_new_tokens)
    # Requests of several questions are asked shortest prompt first: a batch's prompts are padded to
    # its longest (phi3mlflow/batching.py), so neighbours by length pad least.
    order = list(range(len(questions)))
    if size > 1:
        order.sort(key=lambda i: caller.prompt_tokens(questions[i]))
    answers: list = [None] * len(questions)
    done: list[Answer] = []
    with Progress(f"evaluate {caller.key}", len(questions)) as progress:
        for k in range(0, len(order), size):
            ids = order[k : k + size]
            batch = caller.ask([questions[i] for i in ids], max_new_tokens, temperature)
            for i, answer in zip(ids, batch, strict=True):
                answers[i] = answer
            done += batch
            progress.update(len(batch), f"{tokens_per_s(done):.0f} tokens/s")
    seconds = wall_seconds(done)
    print(f"evaluate: {caller.key}: {len(done)} questions in {seconds:.1f} s ({size} per request), "
          f"{tokens_per_s(done):.0f} tokens/s", file=sys.stderr)  # fmt: skip
    return answers


def wall_seconds(answers: list[Answer]) -> float:
    """The wall time of the requests that gave ``answers`` (a batch counted once)."""
    return sum(a.latency_ms / a.batch_size for a in answers) / 1000


def tokens_per_s(answers: list[Answer]) -> float:
    """Generated tokens per second of wall time: the real throughput, batched or not."""
    return sum(a.completion_tokens for a in answers) / max(wall_seconds(answers), 1e-9)
