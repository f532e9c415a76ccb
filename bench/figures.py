"""The benchmark's comparisons. Each returns the median, min and max of per-pair ratios A/B and
the median seconds of each side."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from phi3mlflow import PROJECT_ROOT
from tests.support import free_port, wait_until_up


def interleaved(a, b, pairs: int, ratio=None, reps: int = 1, warm: bool = True) -> dict:
    """Run a and b alternately (A B, B A, ...); ratio(ra, ta, rb, tb) per pair.

    Each side of a pair is one untimed call, then ``reps`` timed back-to-back calls (time per call),
    which damps the noise of a shared machine on calls of a fraction of a second. The untimed call
    is there because with A B, B A order the first side of a pair follows itself and the second
    follows the other side, whose weights have just pushed its own out of the CPU caches: measured
    on int4, that alone made every other pair's ratio ~8 % high and the rest ~6 % low, so the median
    of an odd number of pairs landed on whichever mode had one pair more. ``warm=False`` leaves the
    untimed call out, for sides of many seconds, where cache effects are lost in the noise.
    """
    ratio = ratio or (lambda ra, ta, rb, tb: ta / tb)
    rows = []
    for i in range(pairs):
        order = [(0, a), (1, b)] if i % 2 == 0 else [(1, b), (0, a)]
        got = {}
        for side, fn in order:
            if warm:
                fn()
            start = time.perf_counter()
            for _ in range(reps):
                out = fn()
            got[side] = (out, (time.perf_counter() - start) / reps)
        (ra, ta), (rb, tb) = got[0], got[1]
        rows.append((ratio(ra, ta, rb, tb), ta, tb))
    ratios = [r for r, _, _ in rows]
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "a_median_s": statistics.median(t for _, t, _ in rows),
        "b_median_s": statistics.median(t for _, _, t in rows),
        "ratios": ratios,
    }


@dataclass
class Setup:
    quick: bool
    tmp: Path
    model: str
    model_dir: Path
    prompt: str
    prompt_tokens: int
    new_tokens: int
    uris: dict
    folders: dict

    @property
    def reps(self) -> int:
        """Calls per side of a pair for the generation figures."""
        return 1 if self.quick else 3

    real: bool = False

    @classmethod
    def create(cls, quick: bool, tmp: Path, real: bool = False) -> Setup:
        from phi3mlflow.cli import resolve_model_dir
        from phi3mlflow.onnx_export import export
        from phi3mlflow.tiny import BUILTIN_MODEL
        from steps import onnx_wrapper, pipeline_wrapper

        if quick:
            model, new_tokens = BUILTIN_MODEL, 16
            model_dir = Path(resolve_model_dir(model))
            prompt = "What is the capital of Spain?"
        elif real:
            model, new_tokens = REAL_MODEL, 128
            model_dir = Path(resolve_model_dir(model))
            # A question SmolLM2 answers at length, so that greedy decoding runs most of the 128 tokens.
            prompt = "Write a long story about a dragon who learns to bake bread in a small mountain village."
        else:
            from bench.model import bench_model_dir

            model_dir, new_tokens = bench_model_dir(), 128
            model = str(model_dir)
            prompt = "Describe in detail the history of the old mountain village and its people near the coast."
        uris = {
            "chat": pipeline_wrapper.main(
                pipeline_wrapper.parse_args(["--model", model, "--serve_max_new_tokens", str(new_tokens)])
            ),  # fmt: skip
        }
        folders = {}
        for p in ("fp32", "int4"):
            folders[p] = export(str(model_dir), p)
            args = ["--model", model, "--precision", p, "--serve_max_new_tokens", str(new_tokens)]
            uris[p] = onnx_wrapper.main(onnx_wrapper.parse_args(args))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)

        def length(p):
            messages = [{"role": "user", "content": p}]
            return len(tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)).input_ids)

        while not quick and not real and length(prompt) > 32:  # ~32 prompt tokens once the chat template is applied
            prompt = prompt.rsplit(" ", 1)[0]
        return cls(quick, tmp, model, model_dir, prompt, length(prompt), new_tokens, uris, folders, real)

    def describe(self) -> str:
        if self.quick:
            return "built-in tiny Phi-3 (~0.5 M params)"
        return "SmolLM2-135M-Instruct (real weights)" if self.real else "random-weight Phi-3 (~42 M params)"

    def questions(self) -> list[str]:
        """The questions eval_batch_speedup asks: the real set, all that evaluate asks in the real
        profile, or in quick mode 9 of the bundled set (a batch of 8 and a request of one)."""
        path = PROJECT_ROOT / ("data/questions.jsonl" if self.quick else "data/real_questions.jsonl")
        rows = [json.loads(line)["question"] for line in path.read_text().splitlines() if line.strip()]
        return rows[:9] if self.quick else rows

    def load(self, key: str):
        import mlflow

        return mlflow.pyfunc.load_model(self.uris[key])


REAL_MODEL = "builtin:smollm2-135m-instruct"


class RawGenAI:
    """A plain onnxruntime-genai generate loop, no MLflow: the baseline for the ONNX wrapper."""

    def __init__(self, folder, threads: int):
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tok = og.Tokenizer(self.model)

    def __call__(self, prompt: str, new_tokens: int) -> str:
        og = self.og
        text = self.tok.apply_chat_template(
            json.dumps([{"role": "user", "content": prompt}]), add_generation_prompt=True
        )
        ids = self.tok.encode(text)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        while not gen.is_done():
            gen.generate_next_token()
        return self.tok.decode(gen.get_sequence(0)[len(ids) :])


def onnx_overhead(s: Setup, precision: str, pairs: int) -> dict:
    from phi3mlflow.genai import default_threads

    wrapped, raw = s.load(precision), RawGenAI(s.folders[precision], default_threads())
    out = interleaved(
        lambda: wrapped.predict({"prompt": s.prompt}, params={"max_new_tokens": s.new_tokens})[0],
        lambda: raw(s.prompt, s.new_tokens),
        pairs,
        reps=s.reps,
    )
    out["same_output"] = wrapped.predict({"prompt": s.prompt})[0] == raw(s.prompt, s.new_tokens)
    return out


def tracing_cost(s: Setup, pairs: int) -> dict:
    """One evaluation request with its MLflow trace (A) against the same request with tracing off
    (B), through evaluate's own caller on the int4 model: what a question's spans cost. The trace
    is exported on MLflow's background thread, which shares the cores with generation."""
    import mlflow

    from phi3mlflow.evaluation.callers import OnnxCaller
    from phi3mlflow.evaluation.candidates import ModelRef

    caller = OnnxCaller(ModelRef("onnx_int4", "onnx", "int4", s.uris["int4"], None), str(s.tmp / "tracing"))

    def ask(traced: bool):
        def call():
            (mlflow.tracing.enable if traced else mlflow.tracing.disable)()
            return caller(s.prompt, s.new_tokens, 0.0).text

        return call

    with mlflow.start_run(run_name="tracing_cost"):
        try:
            return interleaved(ask(True), ask(False), pairs, reps=s.reps)
        finally:
            mlflow.tracing.enable()


def eval_batch_speedup(s: Setup, pairs: int) -> dict:
    """evaluate's ONNX answering throughput (generated tokens over wall time, through its own caller
    and ask_all, traced, greedy) with its batches (A) over the same questions one request each
    (B), on the int4 model. Above 1: batching pays."""
    import mlflow

    from phi3mlflow.evaluation import answering
    from phi3mlflow.evaluation.callers import OnnxCaller
    from phi3mlflow.evaluation.candidates import ModelRef

    ref = ModelRef("onnx_int4", "onnx", "int4", s.uris["int4"], None)
    caller = OnnxCaller(ref, str(s.tmp / "eval-batch"))
    questions = s.questions()
    new_tokens = 16 if s.quick else 48  # evaluate's max_new_tokens in the tiny and the real profile
    batch = min(caller.batch_size(new_tokens), 8) if s.quick else caller.batch_size(new_tokens)

    def ask(size: int):
        return lambda: answering.ask_all(caller, questions, new_tokens, 0.0, batch_size=size)

    same = []

    def ratio(ra, ta, rb, tb):
        same.append([a.text for a in ra] == [b.text for b in rb])
        return answering.tokens_per_s(ra) / answering.tokens_per_s(rb)

    with mlflow.start_run(run_name="eval_batch_speedup"):
        # Each side of the real model runs for seconds: no untimed call (cache effects are noise there).
        out = interleaved(ask(batch), ask(1), pairs, ratio=ratio, warm=s.quick)
    out["same_answers"] = all(same)
    out.update(questions=len(questions), questions_per_request=batch, max_new_tokens=new_tokens,
               max_batch_size=caller.chat.max_batch_size)  # fmt: skip
    return out


# evidence_cost asks the first questions of the real set (the quick mode: of the bundled set): each
# side of a pair is a whole evaluation, and the ratio scales with the questions on both sides alike.
EVIDENCE_QUESTIONS = {"real": 60, "quick": 5}


def evidence_cost(s: Setup, pairs: int) -> dict:
    """Wall time of the evaluate step with the current champion asked and the fidelity pass (A) over
    the same evaluation without them (B): the transformers reference and the fp32, int8 and int4
    ONNX candidates (the SmolLM2 profile's; quick mode: fp32 and int4), its max_new_tokens, greedy.
    The champion is an int8 wrapper logged apart (another LoggedModel than the candidates, as after
    a chain whose wrappers were logged anew) and registered as ``bench-evidence@champion``, so A
    asks it every question as a candidate of its own. Below 1.5: the evidence costs less than half
    again the evaluation it decides on."""
    import mlflow

    from phi3mlflow.evaluation import runner
    from steps import onnx_wrapper

    precisions = ("fp32", "int4") if s.quick else ("fp32", "int8", "int4")
    uris = dict(s.uris)

    def log_int8() -> str:
        args = ["--model", s.model, "--precision", "int8", "--serve_max_new_tokens", str(s.new_tokens)]
        return onnx_wrapper.main(onnx_wrapper.parse_args(args))

    if "int8" in precisions and "int8" not in uris:
        uris["int8"] = log_int8()
    champion = log_int8()
    name = "bench-evidence"
    version = mlflow.register_model(champion, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)

    n = EVIDENCE_QUESTIONS["quick" if s.quick else "real"]
    source = PROJECT_ROOT / ("data/questions.jsonl" if s.quick else "data/real_questions.jsonl")
    dataset = s.tmp / "evidence.jsonl"
    dataset.write_text("\n".join(source.read_text().splitlines()[:n]) + "\n")
    base = runner.Settings(
        chat_model_uri=uris["chat"], onnx_model_uris=",".join(uris[p] for p in precisions), dataset=str(dataset),
        max_new_tokens=16 if s.quick else 48, min_accuracy=0.0, max_accuracy_drop=1.0,
    )  # fmt: skip
    with_evidence = replace(base, registered_model_name=name, alias="champion", fidelity=True)
    without = replace(base, registered_model_name="", alias="", fidelity=False)
    seen = {}

    def evaluate(settings: runner.Settings, side: str):
        def call():
            result = runner.evaluate(settings, {})
            seen[side] = sorted(c.key for c in result.candidates)
            seen[f"{side}_fidelity"] = sorted(c.key for c in result.candidates if c.fidelity)
            return result

        return call

    # Each side is a whole evaluation of many seconds: no untimed call.
    out = interleaved(evaluate(with_evidence, "with"), evaluate(without, "without"), pairs, warm=False)
    out.update(questions=n, candidates=seen["with"], fidelity_measured=seen["with_fidelity"],
               candidates_without=seen["without"], champion_version=version)  # fmt: skip
    return out


def noise_floor(s: Setup, precision: str, pairs: int) -> dict:
    """A/A: the raw generate loop against itself, measured like the overhead figures. Its spread is
    what the machine alone does to a ratio."""
    from phi3mlflow.genai import default_threads

    raw = RawGenAI(s.folders[precision], default_threads())
    return interleaved(lambda: raw(s.prompt, s.new_tokens), lambda: raw(s.prompt, s.new_tokens), pairs, reps=s.reps)


def _chat_request(s: Setup, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": s.prompt}], "max_tokens": max_tokens}


def chat_overhead(s: Setup, pairs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = s.load("chat")
    tok = AutoTokenizer.from_pretrained(s.model_dir)
    model = AutoModelForCausalLM.from_pretrained(s.model_dir).eval()

    def raw():
        ids = tok.apply_chat_template([{"role": "user", "content": s.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]  # fmt: skip
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=s.new_tokens, do_sample=False)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return interleaved(lambda: chat.predict(_chat_request(s, s.new_tokens)), raw, pairs, reps=s.reps)


def speedup(s: Setup, pairs: int) -> dict:
    """tokens/s of the int4 ONNX wrapper over tokens/s of the chat wrapper (A = chat, B = ONNX)."""
    chat, onnx = s.load("chat"), s.load("int4")
    counter = onnx.unwrap_python_model().chat

    def ratio(ra, ta, rb, tb):
        chat_tokens = ra[0]["usage"]["completion_tokens"]
        onnx_tokens = counter.completion_tokens(rb[0], s.new_tokens)
        return (onnx_tokens / tb) / (chat_tokens / ta)

    return interleaved(
        lambda: chat.predict(_chat_request(s, s.new_tokens)),
        lambda: onnx.predict({"prompt": s.prompt}, params={"max_new_tokens": s.new_tokens}),
        pairs,
        ratio,
        reps=s.reps,
    )


def _chain_command(s: Setup, experiment: str) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local",
           "--experiment-name", experiment]  # fmt: skip
    if s.quick:
        # A five-question profile keeps the tiny mode short; the full mode runs the default profile.
        profile = yaml.safe_load((PROJECT_ROOT / "params/tiny.yaml").read_text())
        rows = (PROJECT_ROOT / "data/questions.jsonl").read_text().splitlines()[:5]
        (s.tmp / "five.jsonl").write_text("\n".join(rows) + "\n")
        profile.update(dataset=str(s.tmp / "five.jsonl"), registered_model_name="bench-chat")
        (s.tmp / "profile.yaml").write_text(yaml.safe_dump(profile))
        cmd += ["-P", f"params_file={s.tmp / 'profile.yaml'}"]
    return cmd


# The least any MLflow Project entry point costs under `mlflow run`: MLflow's CLI, then one Python
# process that imports MLflow and reads its run from the tracking store. A cached re-run of the chain
# pays the same two, so it can only come in under this by making its own MLflow import cheaper
# (our steps do: see phi3mlflow.cli.run_main).
_FLOOR_MLPROJECT = """name: floor
entry_points:
  main:
    command: "python floor.py"
"""
_FLOOR_SCRIPT = "import os\n\nimport mlflow\n\nmlflow.MlflowClient().get_run(os.environ['MLFLOW_RUN_ID'])\n"


def _timed_run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def cache_rerun(s: Setup, pairs: int) -> dict:
    """A cold `mlflow run .` (a fresh experiment; in full mode an empty model cache too) against an
    immediate identical re-run; then, in the same pair, `mlflow run` of a no-op entry point (the
    floor, reported under ``floor`` as a ratio to the same cold run)."""
    floor_project = s.tmp / "floor-project"
    floor_project.mkdir(exist_ok=True)
    (floor_project / "MLproject").write_text(_FLOOR_MLPROJECT)
    (floor_project / "floor.py").write_text(_FLOOR_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    rows = []
    for i in range(pairs):
        cmd = _chain_command(s, f"cache-{i}")
        if not s.quick:
            # Cold means a fresh machine: the built-in model and its exports are built again too.
            env["PHI3MLFLOW_CACHE"] = str(s.tmp / f"model-cache-{i}")
        cold, rerun = _timed_run(cmd, env), _timed_run(cmd, env)
        floor_cmd = [sys.executable, "-m", "mlflow", "run", str(floor_project), "--env-manager", "local",
                     "--experiment-name", f"floor-{i}"]  # fmt: skip
        rows.append((cold, rerun, _timed_run(floor_cmd, env)))

    def figure(ratios, a):
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                "a_median_s": statistics.median(a), "b_median_s": statistics.median(c for c, _, _ in rows),
                "ratios": ratios}  # fmt: skip

    return {
        **figure([r / c for c, r, _ in rows], [r for _, r, _ in rows]),
        "floor": figure([f / c for c, _, f in rows], [f for _, _, f in rows]),
    }


def register_champion(s: Setup) -> str:
    """The int4 wrapper of the measured model as ``bench-champion@champion``, through the real
    evaluate and register steps (two questions; a random-weight model passes no gate, so force)."""
    import mlflow

    from steps import evaluate, register

    data = s.tmp / "two.jsonl"
    data.write_text("\n".join((PROJECT_ROOT / "data/questions.jsonl").read_text().splitlines()[:2]) + "\n")
    # Through each step's own parser, so the steps' defaults fill what is not given here.
    evaluate.main(evaluate.parse_args(["--onnx_model_uris", s.uris["int4"], "--dataset", str(data),
                                       "--max_new_tokens", str(s.new_tokens), "--min_accuracy", "0"]))  # fmt: skip
    eval_run = mlflow.last_active_run()
    register.main(register.parse_args(["--eval_run_id", eval_run.info.run_id, "--registered_model_name",
                                       "bench-champion", "--force", "true"]))  # fmt: skip
    return "models:/bench-champion@champion"


def _wait_until_up(url: str, server: subprocess.Popen, name: str, timeout: float = 120) -> None:
    """Until ``url`` answers; a server that exits or takes longer than ``timeout`` s is an error."""
    if not wait_until_up(url, server, timeout):
        raise RuntimeError(f"{name} did not start")


def serve_vs_inprocess(s: Setup, pairs: int) -> dict:
    """p50 latency of `mlflow models serve` over HTTP (A) against in-process predict (B)."""
    import mlflow

    uri = register_champion(s)
    model = mlflow.pyfunc.load_model(uri)
    # The ONNX model's signature declares the chat request's fields too: only it takes prompts.
    chat = "prompt" not in model.metadata.signature.inputs.input_names()
    body = _chat_request(s, s.new_tokens) if chat else {"prompt": s.prompt}
    payload = body if chat else {"inputs": {"prompt": [s.prompt]}}
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True,
    )  # fmt: skip
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve")
        data = json.dumps(payload).encode()

        def http():
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", data, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.read()

        out = interleaved(http, lambda: model.predict(body), pairs, reps=s.reps)
        out["wrapper"] = "chat" if chat else "onnx"
        return out
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def time_to_first_token(s: Setup, pairs: int) -> dict:
    """One generated token through each wrapper: prompt processing plus the first decode step."""
    chat, onnx = s.load("chat"), s.load("int4")
    r = interleaved(
        lambda: chat.predict(_chat_request(s, 1)),
        lambda: onnx.predict({"prompt": s.prompt}, params={"max_new_tokens": 1}),
        max(pairs, 3),
    )
    return {"chat": r["a_median_s"], "onnx_int4": r["b_median_s"]}


# VmHWM, not ru_maxrss: a forked child inherits its parent's ru_maxrss, the address space's peak starts anew.
_RSS = """
import json, sys, mlflow
m = mlflow.pyfunc.load_model(sys.argv[1])
m.predict(json.loads(sys.argv[2]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss(s: Setup) -> dict:
    """Peak resident memory (MB) of a fresh process that loads each wrapper and answers once."""
    requests = {"chat": _chat_request(s, s.new_tokens), "fp32": {"prompt": s.prompt}, "int4": {"prompt": s.prompt}}
    out = {}
    for key, req in requests.items():
        proc = subprocess.run([sys.executable, "-c", _RSS, s.uris[key], json.dumps(req)], capture_output=True,
                              text=True, check=True, env=dict(os.environ))  # fmt: skip
        out[key if key == "chat" else f"onnx_{key}"] = int(proc.stdout.strip().splitlines()[-1]) / 1024
    return out


CONCURRENT_CLIENTS = 8


def _stream_chat(port: int, prompt: str, max_tokens: int) -> int:
    """One streaming chat completion through the OpenAI-compatible server; its completion tokens."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response, tokens = conn.getresponse(), 0
    for line in response:
        if line.startswith(b"data: {"):
            usage = json.loads(line[6:]).get("usage")
            tokens = usage["completion_tokens"] if usage else tokens
    conn.close()
    return tokens


def serve_concurrency_throughput(s: Setup, pairs: int) -> dict:
    """Generated tokens/s of the int4 ONNX model behind `python -m phi3mlflow.serve`: 8 concurrent
    streaming clients (A) over the same 8 requests one after another (B). Above 1: batching pays."""
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "phi3mlflow.serve", s.uris["int4"], "--port", str(port)], cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ), start_new_session=True,
    )  # fmt: skip
    prompts = [f"{s.prompt} ({i + 1})" for i in range(CONCURRENT_CLIENTS)]
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/health", server, "python -m phi3mlflow.serve")
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:

            def concurrent() -> int:
                return sum(pool.map(lambda p: _stream_chat(port, p, s.new_tokens), prompts))

            def sequential() -> int:
                return sum(_stream_chat(port, p, s.new_tokens) for p in prompts)

            out = interleaved(concurrent, sequential, pairs, ratio=lambda ra, ta, rb, tb: (ra / ta) / (rb / tb),
                              reps=s.reps)  # fmt: skip
        out["clients"] = CONCURRENT_CLIENTS
        return out
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
