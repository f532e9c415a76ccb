"""Whether ORT GenAI's Python calls let other Python threads run while they compute.

The server's event loop (reading requests, tokenizing, writing stream chunks) and the batching
loop's worker share one process. A Python thread counts in a tight loop for two seconds alone,
then for two seconds while another thread runs og calls back to back: a prefill of 8 copies of a
prompt (``Generator.append_tokens``), then decode steps (``generate_next_token``); each call's rate
alone is measured first. With ``--threads 1`` ORT computes on one core and leaves the other to the
counter: a call that released the GIL would leave the counter near its rate alone and run at its
own rate alone; one that holds it leaves the counter only the gaps the interpreter's switch
interval forces, and both slow down. With ``--threads 2`` on 2 cores the two effects mix (three
threads share two cores whatever the GIL does):

    python -m bench.gil_probe [--model builtin:smollm2-135m-instruct] [--precision int4] [--threads 2]

Prints, per kind of call, its rate alone and beside the counter, and the counter's rate beside it
over its rate alone. The figures
and what they mean for serving are in bench/README.md ("The GIL and the server").
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

WINDOW_S = 2.0
PROMPT = "Write a long story about a dragon who learns to bake bread in a small mountain village."


def _count(seconds: float) -> int:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gil_probe", description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--precision", default="int4")
    threads = "ORT's intra-op threads (the server's default: all cores); 1 leaves a core to the counter"
    p.add_argument("--threads", type=int, default=2, help=threads)
    args = p.parse_args(argv)

    import onnxruntime_genai as og  # heavy: the model runtime

    from phi3mlflow import sources
    from phi3mlflow.batching import start_generator
    from phi3mlflow.onnx_export import export

    folder = export(str(sources.resolve(sources.check(args.model))), args.precision)
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ids = np.asarray(tokenizer.encode(tokenizer.apply_chat_template(
        json.dumps([{"role": "user", "content": PROMPT}]), add_generation_prompt=True)), dtype=np.int32)  # fmt: skip

    context = json.loads((folder / "genai_config.json").read_text())["model"]["context_length"]

    def generator(rows: int):  # the batching loop's own setup: greedy, the rows appended at once
        return start_generator(og, model, np.stack([ids] * rows), min(context, len(ids) + 1024))

    decoding = [generator(1)]

    def step() -> None:
        if decoding[0].is_done():  # at the end of its length: a new one (a prefill every ~1000 steps)
            decoding[0] = generator(1)
        decoding[0].generate_next_token()

    calls = {"prefill of 8 rows (append_tokens)": lambda: generator(8), "decode step (generate_next_token)": step}
    alone = _count(WINDOW_S) / WINDOW_S
    out = {}
    for name, call in calls.items():
        call()  # warm
        start = time.perf_counter()
        made_alone = 0
        while time.perf_counter() - start < WINDOW_S:
            call()
            made_alone += 1
        rate_alone = made_alone / (time.perf_counter() - start)

        done: list[float] = []  # when each call beside the counter ended
        failed: list[Exception] = []
        stop = threading.Event()

        def work(call=call, done=done, stop=stop, failed=failed):
            try:
                while not stop.is_set():
                    call()
                    done.append(time.perf_counter())
            except Exception as e:  # noqa: BLE001 - raised again by the main thread
                failed.append(e)

        worker = threading.Thread(target=work)
        worker.start()
        begin = time.perf_counter()
        counted = _count(WINDOW_S)
        end = time.perf_counter()
        stop.set()
        worker.join()
        if failed:
            raise SystemExit(f"gil_probe: {name} failed: {failed[0]}")
        counter = counted / (end - begin) / alone
        rate_beside = sum(begin <= t <= end for t in done) / (end - begin)
        out[name] = {"counter_rate_beside_over_alone": round(counter, 3), "calls_per_s_alone": round(rate_alone, 1),
                     "calls_per_s_beside": round(rate_beside, 1)}  # fmt: skip
        print(f"{name}: {rate_alone:.1f} calls/s alone, {rate_beside:.1f} beside the counting thread, which ran "
              f"at {counter:.2f} of its rate alone ({args.threads} ORT threads, {os.cpu_count()} cores)")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
