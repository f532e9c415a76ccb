"""Distribution fidelity of a model's ONNX exports against its transformers source (phi3mlflow.fidelity).

The reference answers each question greedily (``model.generate``), then every export is
teacher-forced on those answers and compared position by position over the full vocabulary:

    PHI3MLFLOW_CACHE=... python -m bench.fidelity_probe [--model builtin:smollm2-135m-instruct]
        [--questions data/real_questions.jsonl] [--limit 132] [--max-new-tokens 48]
        [--precisions fp32,int8,int4] [--stepwise] [--check-stepwise 3] [--answers answers.json]
        [--threads N] [--out fidelity.json]

Prints one Markdown row per export (KLD mean / p99 / max, top-1 agreement, perplexity ratio,
positions, wall time of its forward passes) and the reference's generation and forward-pass
times. Exports and converted models come from the model cache, and ``--answers`` keeps the
reference's answers (read when the file exists, written otherwise), so a re-run only measures.
``--stepwise`` scores the exports by decoding token by token, the path generation takes, instead
of one prefill per answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--questions", default=str(ROOT / "data" / "real_questions.jsonl"))
    ap.add_argument("--limit", type=int, default=132)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--stepwise", action="store_true", help="score by decoding instead of one prefill")
    ap.add_argument("--check-stepwise", type=int, default=3, help="sequences on which one prefill is checked")
    ap.add_argument("--answers", help="the reference's answers as JSON: read if it exists, else written")
    ap.add_argument("--threads", type=int, default=0, help="torch and ORT threads (default: all cores)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi3mlflow import fidelity, sources
    from phi3mlflow.genai import GenAIChat
    from phi3mlflow.onnx_export import export

    start = time.perf_counter()
    folder = sources.resolve(sources.check(args.model))
    exports = {p: export(str(folder), p) for p in args.precisions.split(",")}
    print(f"model and exports ready in {time.perf_counter() - start:.1f} s: {folder}", flush=True)

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = fidelity.TransformersScorer(model, AutoTokenizer.from_pretrained(folder))
    chats = {p: GenAIChat(f, intra_op_num_threads=threads) for p, f in exports.items()}
    for p, chat in chats.items():
        print(f"{p}: same tokenizer as the reference: {fidelity.same_tokenizer(reference, chat)}", flush=True)

    with open(args.questions, encoding="utf-8") as f:
        questions = [json.loads(line)["question"] for line in f if line.strip()][: args.limit]
    start = time.perf_counter()
    if args.answers and Path(args.answers).is_file():
        answers = json.loads(Path(args.answers).read_text())[: len(questions)]
    else:
        answers = []
        for i, q in enumerate(questions, 1):
            answers.append(reference.answer(q, args.max_new_tokens))
            print(f"\ranswers {i}/{len(questions)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        if args.answers:
            Path(args.answers).write_text(json.dumps(answers, indent=1) + "\n")
    generate_s = time.perf_counter() - start
    print(f"reference answers: {len(answers)} in {generate_s:.1f} s", flush=True)

    for p, chat in chats.items():
        probe = fidelity.GenAIScorer(chat)
        for q, a in list(zip(questions, answers, strict=True))[: args.check_stepwise]:
            prompt, ids = reference.sequence(q, a)
            diff = np.abs(probe.logprobs(prompt, ids) - probe.logprobs_stepwise(prompt, ids)).max()
            print(f"{p}: one prefill vs decoding, {len(ids)} positions: max |d log p| = {diff:.2e}", flush=True)
    candidates = {p: fidelity.GenAIScorer(chat, stepwise=args.stepwise) for p, chat in chats.items()}

    start = time.perf_counter()
    figures = fidelity.measure(
        reference, candidates, questions, answers,
        progress=lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(file=sys.stderr)
    total_s = time.perf_counter() - start

    print("\n| export | kld_mean | kld_p99 | kld_max | top1_agreement | ppl_ratio | positions | skipped | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, fid in figures.items():
        print(f"| {p} | {fid.kld_mean:.3g} | {fid.kld_p99:.3g} | {fid.kld_max:.3g} | {fid.top1_agreement:.4f} "
              f"| {fid.ppl_ratio:.4f} | {fid.positions} | {fid.skipped} | {candidates[p].seconds:.1f} |")  # fmt: skip
    print(f"\nreference: greedy answers {generate_s:.1f} s, forward passes {reference.seconds:.1f} s; "
          f"fidelity pass in all {total_s:.1f} s ({len(questions)} questions)")  # fmt: skip
    if args.out:
        record = {
            "model": args.model,
            "questions": len(questions),
            "stepwise": args.stepwise,
            "reference_generate_s": generate_s,
            "reference_forward_s": reference.seconds,
            "exports": {
                p: {**fid.metrics(), "positions": fid.positions, "skipped": fid.skipped,
                    "seconds": candidates[p].seconds}
                for p, fid in figures.items()
            },
        }  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
