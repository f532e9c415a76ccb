"""``python -m bench --peer llamacpp``: the logged ONNX pyfunc and raw ORT GenAI against llama.cpp
(through llama-cpp-python) on the same random-weight Phi-3, the same prompt ids and the same cores.

An optional extra, never run by the test suite or CI: it needs llama-cpp-python (compiled from
source, see requirements-peer.txt) and fetches the matching sdist from the package index for
llama.cpp's own ``convert_hf_to_gguf.py``.

The bench model is converted to GGUF F32 and F16 by that script, then quantised by llama.cpp to
Q8_0 and Q4_0 with every tensor Q4_0 ("pure", closest to the ORT int4 export). Each figure is the
median of interleaved per-pair ratios of llama.cpp's time over ours for the same 128 greedy tokens
after the same prompt ids, prompt processing included, so > 1 means we are faster.

With ``--model smollm2`` (the real model): llama.cpp runs the very Q4_1 file the project converts
(``builtin:smollm2-135m-instruct``) against our int4 export of it, and Q8_0 and F16 that llama.cpp's
own tools make from the same (dequantised) weights against our int8 and fp32; both sides stop at
the end token. Parity counts how many greedy tokens of llama.cpp F32 and F16 agree with our fp32.

Serving (section ``serving``): our OpenAI-compatible server (``python -m phi3mlflow.serve``, the int4
model) against llama.cpp's own (``python -m llama_cpp.server``, the Q4_1 file on the real model, Q4_0
on the bench model), 8 streaming chat requests sent one after another (1 client) and all at once
(8 clients), interleaved pairs: generated tokens/s ours / theirs, and time to first token p50/p95 of
each. ``--only serving`` runs this section alone (``in_process`` the rest).

KL ladder (section ``kl``, ``--model smollm2`` only): llama.cpp's own quantisations against its F32,
measured as ``llama-perplexity --kl-divergence`` does (per-position KL divergence over the full
vocabulary: mean, 99th percentile, same top token), but teacher-forced on the transformers
reference's greedy answers to the real questions, the sequences our fidelity pass scores; our ONNX
exports are scored on the same sequences against transformers in the same pass, side by side.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench import figures as fig
from tests.support import free_port

DOCUMENTED_CMAKE_ARGS = (
    "-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "-DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"
)
# Quantisation types of llama.h (llama_ftype).
FTYPES = {"q4_0": 2, "q8_0": 7}
# The ORT GenAI precision each llama.cpp format is compared with, by figure name.
PAIRS = {
    "onnx_int4_vs_llamacpp_q4_0": ("int4", "q4_0"),
    "onnx_int8_vs_llamacpp_q8_0": ("int8", "q8_0"),
    "onnx_fp32_vs_llamacpp_f16": ("fp32", "f16"),
}
TARGETS = {"onnx_int4_vs_llamacpp_q4_0": 1.10, "onnx_int8_vs_llamacpp_q8_0": 1.15}
# On the real model (--model smollm2): llama.cpp runs the very Q4_1 file the project converts
# (builtin:smollm2-135m-instruct), and Q8_0/F16/F32 that its own tools make from the same weights.
REAL_PAIRS = {
    "real_int4_vs_llamacpp_q4_1": ("int4", "q4_1"),
    "real_int8_vs_llamacpp_q8_0": ("int8", "q8_0"),
    "real_fp32_vs_llamacpp_f16": ("fp32", "f16"),
}
REAL_TARGETS = {"real_int4_vs_llamacpp_q4_1": 1.25, "real_int8_vs_llamacpp_q8_0": 1.15}
SECTIONS = ("in_process", "serving", "kl")
# The KL ladder (section kl, the real model only): the first questions of the real set, as the
# distribution-fidelity figures of bench/README.md were first measured.
KL_QUESTIONS = 132
# Serving: ours / llama.cpp's server, tokens/s at 1 and 8 clients.
SERVE_TARGETS = {"serve_1_client_vs_llamacpp": 1.0, "serve_8_clients_vs_llamacpp": 1.0}
SERVE_TTFT_TARGET = 1.0  # serve_ttft_vs_llamacpp: ours / theirs, lower is better

# convert_hf_to_gguf refuses a BPE vocabulary whose pre-tokenizer it has no hash for (ours is
# self-trained). Its split is the byte-level GPT-2 regex, which llama.cpp calls "gpt-2".
# Its Llama vocabulary code imports sentencepiece before it looks for a tokenizer.model, which these
# folders lack (it then falls back to tokenizer.json): without the package, look first.
_CONVERT = """
import sys
sys.path[:0] = [sys.argv.pop(1), sys.argv.pop(1)]
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
_sentencepiece = TextModel._create_vocab_sentencepiece
def _vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(self.dir_model / "tokenizer.model")
    return _sentencepiece(self)
TextModel._create_vocab_sentencepiece = _vocab_sentencepiece
convert_hf_to_gguf.main()
"""


def llama_cpp_source(tmp: Path) -> tuple[Path, str]:
    """llama.cpp's converter and gguf-py from the sdist of the installed llama-cpp-python (the tree it
    was built from), and the llama.cpp commit its changelog names for that release."""
    from importlib.metadata import version

    v = version("llama-cpp-python")
    dl = tmp / "sdist"
    if (tmp / "src").is_dir():  # fetched already by another section of this run
        root = next((tmp / "src").glob("llama_cpp_python-*"))
        release = (root / "CHANGELOG.md").read_text().split(f"## [{v}]", 1)[-1].split("\n## [", 1)[0]
        commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", release)
        return root / "vendor" / "llama.cpp", commit.group(1) if commit else "unknown"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                    f"llama-cpp-python=={v}", "-d", str(dl)], check=True)  # fmt: skip
    [archive] = dl.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("/CHANGELOG.md") or "/vendor/llama.cpp/" in m.name
                   and any(k in m.name for k in ("/gguf-py/", "/conversion/", "convert_hf_to_gguf.py"))]  # fmt: skip
        tar.extractall(tmp / "src", members=members, filter="data")
    root = next((tmp / "src").glob("llama_cpp_python-*"))
    release = (root / "CHANGELOG.md").read_text().split(f"## [{v}]", 1)[-1].split("\n## [", 1)[0]
    commit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", release)
    return root / "vendor" / "llama.cpp", commit.group(1) if commit else "unknown"


# SmolLM2's tokenizer.json here is the one the project rebuilds from the GGUF, whose hash llama.cpp
# may not know: name its pre-tokenizer as the shipped GGUF does.
_CONVERT_REAL = _CONVERT.replace('"gpt-2"', '"smollm"')


def convert(model_dir: Path, src: Path, out: Path, outtype: str, real: bool = False) -> Path:
    script = out.parent / "convert.py"
    script.write_text(_CONVERT_REAL if real else _CONVERT)
    proc = subprocess.run([sys.executable, str(script), str(src), str(src / "gguf-py"), str(model_dir),
                           "--outtype", outtype, "--outfile", str(out),
                           # A name with "phi3" in it makes llama.cpp give Phi-3's own special tokens
                           # (</s>, <unk>) attributes, and fail to load a vocabulary without them.
                           "--model-name", "smollm2" if real else "bench-random"],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf --outtype {outtype} failed:\n{proc.stderr[-3000:]}")
    return out


def quantize(f16: Path, out: Path, kind: str) -> Path:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.pure = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize to {kind} failed")
    return out


class LlamaCpp:
    """Greedy generation from prompt ids with llama.cpp; the KV cache is cleared per call."""

    SETTINGS = {"n_ctx": 512, "n_batch": 512, "flash_attn": False, "type_k": "f16", "type_v": "f16"}

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        # type_k/type_v in SETTINGS are llama.cpp's defaults, recorded rather than passed.
        chosen = {k: self.SETTINGS[k] for k in ("n_ctx", "n_batch", "flash_attn")}
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, verbose=False, seed=0,
                         **chosen)  # fmt: skip

    def ids(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        """Greedy ids up to ``new_tokens``, ending before an end token (as ORT GenAI's sequence does)."""
        self.llm.reset()
        out = []
        eos = self.llm.token_eos()
        for token in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            if token == eos:
                break
            out.append(token)
            if len(out) == new_tokens:
                break
        return out

    def first_token(self, prompt_ids: list[int]) -> int:
        return self.ids(prompt_ids, 1)[0]


def build_info(commit: str) -> dict:
    import llama_cpp

    system = llama_cpp.llama_print_system_info().decode()
    return {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": commit,
        # The build does not record its flags: CMAKE_ARGS of this shell if set, else the documented ones.
        "build_flags": os.environ.get("CMAKE_ARGS") or f"{DOCUMENTED_CMAKE_ARGS} (requirements-peer.txt)",
        "system_info": system,
        "settings": LlamaCpp.SETTINGS | {"quantization": "pure (every tensor the named type)"},
    }


def run(setup: fig.Setup, pairs: int, tmp: Path, only: list[str] | tuple[str, ...] = ()) -> dict:
    """The sections named in ``only`` (all by default); returns the JSON report's part."""
    sections = only or SECTIONS
    out = in_process(setup, pairs, tmp) if "in_process" in sections else {}
    if "serving" in sections:
        out["serving"] = serving(setup, _serving_gguf(setup, tmp), pairs)
    if "kl" in sections:
        out["kl"] = kl_ladder(setup, tmp)
    return out


def _serving_gguf(setup: fig.Setup, tmp: Path) -> Path:
    """The file llama.cpp's server runs: the shipped Q4_1 on the real model, else the bench model's
    Q4_0 that the in_process section makes."""
    if setup.real:
        from phi3mlflow.gguf import builtin_smollm2_path

        return builtin_smollm2_path()
    q4_0 = tmp / "gguf" / "model-q4_0.gguf"
    if not q4_0.exists():
        raise SystemExit("--only serving: on the bench model it needs the in_process section's Q4_0 file")
    return q4_0


def in_process(setup: fig.Setup, pairs: int, tmp: Path) -> dict:
    """Every in-process peer figure, the greedy parity check, TTFT and peak RSS."""
    from phi3mlflow.genai import GenAIChat, SearchOptions, default_threads
    from phi3mlflow.onnx_export import export
    from steps import onnx_wrapper

    threads = default_threads()
    gguf_dir = tmp / "gguf"
    gguf_dir.mkdir()
    src, commit = llama_cpp_source(tmp)
    real = setup.real
    pairs_of = REAL_PAIRS if real else PAIRS
    ggufs = {t: convert(setup.model_dir, src, gguf_dir / f"model-{t}.gguf", t, real) for t in ("f32", "f16")}
    for kind in ("q8_0",) if real else FTYPES:
        ggufs[kind] = quantize(ggufs["f16"], gguf_dir / f"model-{kind}.gguf", kind)
    if real:
        from phi3mlflow.gguf import builtin_smollm2_path

        ggufs["q4_1"] = builtin_smollm2_path()  # the shipped file itself
    folders = {p: export(str(setup.model_dir), p) for p in ("fp32", "int8", "int4")}
    if not real:
        # fp16 is not a precision the wrapper offers (no fp16 kernels on most CPUs), so it is measured raw.
        folders["fp16"] = tmp / "ort-fp16"
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(setup.model_dir),
                        "-o", str(folders["fp16"]), "-p", "fp16", "-e", "cpu", "-c", str(tmp / "hf-cache")],
                       check=True, capture_output=True)  # fmt: skip
    uris = dict(setup.uris)
    args = ["--model", setup.model, "--precision", "int8", "--serve_max_new_tokens", str(setup.new_tokens)]
    uris["int8"] = onnx_wrapper.main(onnx_wrapper.parse_args(args))

    chat = GenAIChat(folders["fp32"], threads)
    prompt_ids = [int(t) for t in chat.encode(setup.prompt)]
    opts = SearchOptions(max_new_tokens=setup.new_tokens)
    n = setup.new_tokens

    # Parity: llama.cpp F32 and ORT fp32 greedy ids for the same prompt ids.
    f32 = LlamaCpp(ggufs["f32"], threads)
    llama_tokens = f32.llm.tokenize(chat.format_prompt(setup.prompt).encode(), add_bos=False, special=True)
    ours = [int(t) for t in chat.generate_ids(prompt_ids, opts)]
    theirs = f32.ids(prompt_ids, n)
    parity = {
        "same_prompt_ids": list(llama_tokens) == list(prompt_ids),
        "f32_ids_equal_ort_fp32": theirs == ours,
        "ort_fp32_tokens": len(ours),
        "f32_tokens_agreeing": _agreeing(theirs, ours),
    }
    del f32
    if real:
        f16 = LlamaCpp(ggufs["f16"], threads)
        parity["f16_tokens_agreeing"] = _agreeing(f16.ids(prompt_ids, n), ours)
        del f16

    import mlflow

    figures, raw_figures, ttft = {}, {}, {}
    for name, (precision, kind) in pairs_of.items():
        llama = LlamaCpp(ggufs[kind], threads)
        wrapped = mlflow.pyfunc.load_model(uris[precision])
        raw = fig.RawGenAI(folders[precision], threads)
        figures[name] = fig.interleaved(
            lambda llama=llama: llama.ids(prompt_ids, n),
            lambda w=wrapped: w.predict({"prompt": setup.prompt}, params={"max_new_tokens": n}),
            pairs, reps=setup.reps,
        )  # fmt: skip
        raw_figures[name.replace("onnx_", "raw_ortgenai_").replace("real_", "real_raw_ortgenai_")] = fig.interleaved(
            lambda llama=llama: llama.ids(prompt_ids, n), lambda r=raw: r(setup.prompt, n), pairs, reps=setup.reps
        )
        t = fig.interleaved(
            lambda llama=llama: llama.first_token(prompt_ids),
            lambda w=wrapped: w.predict({"prompt": setup.prompt}, params={"max_new_tokens": 1}),
            max(pairs, 3),
        )
        ttft[f"llamacpp_{kind}"], ttft[f"onnx_{precision}"] = t["a_median_s"], t["b_median_s"]
        del llama, wrapped, raw
    if not real:
        f16, ort16 = LlamaCpp(ggufs["f16"], threads), fig.RawGenAI(folders["fp16"], threads)
        raw_figures["raw_ortgenai_fp16_vs_llamacpp_f16"] = fig.interleaved(
            lambda: f16.ids(prompt_ids, n), lambda: ort16(setup.prompt, n), pairs, reps=setup.reps
        )
    for r in (figures | raw_figures).values():
        r["a_tokens_per_s"], r["b_tokens_per_s"] = n / r["a_median_s"], n / r["b_median_s"]
    return {
        **{name: r["median"] for name, r in figures.items()},
        "parity": parity,
        "llamacpp": build_info(commit),
        "figures": figures,
        "raw_figures": raw_figures,
        "ttft_s": ttft,
        "peak_rss_mb": peak_rss(ggufs, uris, prompt_ids, setup, threads, [k for _, k in pairs_of.values()]),
        "gguf_mb": {k: round(p.stat().st_size / 2**20, 1) for k, p in ggufs.items()},
    }


class LlamaCppScorer:
    """llama.cpp's logits at every position of prompt + answer (``logits_all``), as the perplexity
    tool reads them: one evaluation per sequence, the KV cache cleared before each."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                         logits_all=True, verbose=False, seed=0)  # fmt: skip
        self.vocab_size = self.llm.n_vocab()

    def logits(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """``[len(answer), vocab]`` float32 logits predicting each answer token."""
        ids = list(prompt) + list(answer[:-1])
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[len(prompt) - 1 : len(ids)], dtype=np.float32)


def kl_ladder(setup: fig.Setup, tmp: Path) -> dict:
    """llama.cpp's F16, Q8_0 and Q4_1 against its F32 (and each against transformers), our ONNX
    fp32/int8/int4 against transformers, on the transformers reference's greedy answers to the first
    KL_QUESTIONS real questions (phi3mlflow.fidelity's Accumulator: KL(P_ref || P_cand) per answer
    position, full vocabulary). F32 and F16 are llama.cpp's conversion of the dequantised weights;
    Q8_0 is quantised from that F32 (every tensor Q8_0); Q4_1 is the shipped file itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from phi3mlflow import fidelity
    from phi3mlflow.genai import GenAIChat, default_threads
    from phi3mlflow.gguf import builtin_smollm2_path
    from phi3mlflow.onnx_export import export

    if not setup.real:
        raise SystemExit("--only kl: the KL ladder runs on the real model only (--model smollm2)")
    threads = default_threads()
    gguf_dir = tmp / "gguf-kl"
    gguf_dir.mkdir(exist_ok=True)
    src, commit = llama_cpp_source(tmp)
    ggufs = {t.upper(): convert(setup.model_dir, src, gguf_dir / f"model-{t}.gguf", t, True) for t in ("f32", "f16")}
    ggufs["Q8_0"] = quantize(ggufs["F32"], gguf_dir / "model-q8_0.gguf", "q8_0")
    ggufs["Q4_1"] = builtin_smollm2_path()

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(setup.model_dir, dtype=torch.float32).eval()
    reference = fidelity.TransformersScorer(model, AutoTokenizer.from_pretrained(setup.model_dir))
    rows = (fig.PROJECT_ROOT / "data/real_questions.jsonl").read_text().splitlines()
    questions = [json.loads(line)["question"] for line in rows if line.strip()][:KL_QUESTIONS]
    start = time.perf_counter()
    answers = [reference.answer(q, 48) for q in questions]  # the real profile's max_new_tokens
    answer_s = time.perf_counter() - start
    llama = {kind: LlamaCppScorer(path, threads) for kind, path in ggufs.items()}
    onnx = {
        p: fidelity.GenAIScorer(GenAIChat(export(str(setup.model_dir), p), threads)) for p in ("fp32", "int8", "int4")
    }
    if any(s.vocab_size != reference.vocab_size for s in (*llama.values(), *onnx.values())):
        raise RuntimeError("a vocabulary size differs from the reference's")
    # (candidate, reference) -> accumulator
    pairs = {(f"onnx_{p}", "transformers") for p in onnx} | {(f"llamacpp_{k}", "transformers") for k in llama}
    pairs |= {(f"llamacpp_{k}", "llamacpp_F32") for k in llama if k != "F32"}
    accs = {pair: fidelity.Accumulator() for pair in sorted(pairs)}
    positions = 0
    for question, answer in zip(questions, answers, strict=True):
        prompt, ids = reference.sequence(question, answer)
        lp = {"transformers": reference.logprobs(prompt, ids)}
        lp |= {f"onnx_{p}": s.logprobs(prompt, ids) for p, s in onnx.items()}
        lp |= {f"llamacpp_{k}": fidelity.log_softmax(s.logits(prompt, ids)) for k, s in llama.items()}
        for (cand, ref), acc in accs.items():
            acc.add(lp[ref], lp[cand], ids)
        positions += len(ids)
    figures = {f"{cand} vs {ref}": {**acc.result().metrics(), "positions": acc.result().positions}
               for (cand, ref), acc in accs.items()}  # fmt: skip
    return {
        "questions": len(questions),
        "positions": positions,
        "reference_answers_s": round(answer_s, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "ggufs": {k: p.name for k, p in ggufs.items()},
        "llamacpp": build_info(commit),
        "figures": figures,
    }


def _stream(port: int, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    """One streaming chat completion (greedy): its text, seconds to the first content, seconds in all."""
    import http.client

    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}  # fmt: skip
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response, text, first = conn.getresponse(), [], None
    if response.status != 200:
        raise RuntimeError(f"port {port}: HTTP {response.status}: {response.read()[:300]!r}")
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                first = first if first is not None else time.perf_counter() - start
                text.append(content)
    conn.close()
    return "".join(text), first if first is not None else float("nan"), time.perf_counter() - start


def serving(setup: fig.Setup, gguf: Path, pairs: int) -> dict:
    """Our server on the int4 model against llama.cpp's server on ``gguf``, 2 threads each, the same
    8 prompts (the bench prompt numbered), greedy, up to the bench's new tokens, streamed. Tokens are
    counted by one tokenizer (ours; the GGUF's vocabulary is the same) on the text each side streamed,
    so both sides are counted alike. llama.cpp's server runs one request at a time (its own lock;
    ``--interrupt_requests False`` so that a waiting request does not cut the running one off)."""
    from phi3mlflow.genai import GenAIChat, default_threads

    threads = default_threads()
    ours_port, theirs_port = free_port(), free_port()
    env = dict(os.environ)
    servers = {
        "ours": subprocess.Popen(
            [sys.executable, "-m", "phi3mlflow.serve", setup.uris["int4"], "--port", str(ours_port)],
            cwd=fig.PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
        "llama.cpp": subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
             "--port", str(theirs_port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
             "--n_ctx", "2048", "--interrupt_requests", "False", "--verbose", "False"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        ),
    }  # fmt: skip
    try:
        fig._wait_until_up(f"http://127.0.0.1:{ours_port}/health", servers["ours"], "python -m phi3mlflow.serve")
        fig._wait_until_up(f"http://127.0.0.1:{theirs_port}/v1/models", servers["llama.cpp"], "llama_cpp.server")
        tokenizer = GenAIChat(setup.folders["int4"], 1).tokenizer
        prompts = [f"{setup.prompt} ({i + 1})" for i in range(fig.CONCURRENT_CLIENTS)]
        out: dict = {"gguf": gguf.name, "threads": threads, "requests": len(prompts), "max_tokens": setup.new_tokens}
        count = lambda texts: sum(len(tokenizer.encode(t)) for t in texts)  # noqa: E731
        for clients in (1, len(prompts)):
            name = "serve_1_client_vs_llamacpp" if clients == 1 else f"serve_{clients}_clients_vs_llamacpp"
            out[name] = _clients_figure((ours_port, theirs_port), prompts, clients, setup.new_tokens, count, pairs)
        # Issue #27's one-client figure: our p50 time to first token over llama.cpp's, from the same pairs.
        one = out["serve_1_client_vs_llamacpp"]["ttft_ms"]
        out["serve_ttft_vs_llamacpp"] = one["ours"]["p50"] / one["llama.cpp"]["p50"]
        return out
    finally:
        for server in servers.values():
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def _clients_figure(ports: tuple[int, int], prompts: list[str], clients: int, max_tokens: int, count,
                    pairs: int) -> dict:  # fmt: skip
    """Tokens/s ratio ours / theirs with ``prompts`` sent by ``clients`` at once, and each side's TTFT."""
    ttfts: dict[str, list[float]] = {"ours": [], "llama.cpp": []}

    def side(port: int, name: str) -> int:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: _stream(port, p, max_tokens), prompts))
        ttfts[name] += [first for _, first, _ in results]
        return count(text for text, _, _ in results)

    r = fig.interleaved(lambda: side(ports[0], "ours"), lambda: side(ports[1], "llama.cpp"), pairs,
                        ratio=lambda ra, ta, rb, tb: (ra / ta) / (rb / tb))  # fmt: skip
    r["ttft_ms"] = {k: {"p50": 1000 * statistics.median(v), "p95": 1000 * _p95(v)} for k, v in ttfts.items()}
    return r


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


_RSS = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench.peer import LlamaCpp
LlamaCpp(Path(sys.argv[2]), int(sys.argv[3])).ids(json.loads(sys.argv[4]), int(sys.argv[5]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _agreeing(a: list[int], b: list[int]) -> int:
    """Greedy tokens that agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def peak_rss(ggufs: dict, uris: dict, prompt_ids, setup: fig.Setup, threads: int, kinds: list[str]) -> dict:
    from phi3mlflow import PROJECT_ROOT

    out = {}
    for kind in kinds:
        proc = subprocess.run([sys.executable, "-c", _RSS, str(PROJECT_ROOT), str(ggufs[kind]), str(threads),
                               json.dumps(list(prompt_ids)), str(setup.new_tokens)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        out[f"llamacpp_{kind}"] = int(proc.stdout.strip().splitlines()[-1]) / 1024
    for precision in ("int4", "int8", "fp32"):
        proc = subprocess.run([sys.executable, "-c", fig._RSS, uris[precision], json.dumps({"prompt": setup.prompt})],
                              capture_output=True, text=True, check=True, env=dict(os.environ))  # fmt: skip
        out[f"onnx_{precision}"] = int(proc.stdout.strip().splitlines()[-1]) / 1024
    return out


def markdown(report: dict) -> str:
    rows = [
        "| figure | median | min | max | ours tok/s | llama.cpp tok/s | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in {**report.get("figures", {}), **report.get("raw_figures", {})}.items():
        target = {**TARGETS, **REAL_TARGETS}.get(name)
        met = "" if target is None else ("yes" if r["median"] >= target else "no")
        goal = f">= {target}" if target else "(reported)"
        rows.append(
            f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {r['b_tokens_per_s']:.0f} | "
            f"{r['a_tokens_per_s']:.0f} | {goal} | {met} |"
        )
    lines = rows if len(rows) > 2 else []
    if "parity" in report:
        ttft = ", ".join(f"{k} {v * 1000:.1f}" for k, v in report["ttft_s"].items())
        rss = ", ".join(f"{k} {v:.0f}" for k, v in report["peak_rss_mb"].items())
        lines += ["", f"parity: {report['parity']}", f"time to first token (ms): {ttft}", f"peak RSS (MB): {rss}"]
    if "kl" in report:
        kl = report["kl"]
        lines += ["", f"KL ladder: {kl['questions']} questions, {kl['positions']} answer positions, teacher-forced "
                  "on the transformers reference's greedy answers", "",
                  "| candidate vs reference | KLD mean | KLD p99 | KLD max | same top token | ppl ratio |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, f in kl["figures"].items():
            lines.append(f"| {name} | {f['kld_mean']:.3g} | {f['kld_p99']:.3g} | {f['kld_max']:.3g} | "
                         f"{100 * f['top1_agreement']:.2f} % | {f['ppl_ratio']:.4f} |")  # fmt: skip
    if "serving" in report:
        sv = report["serving"]
        lines += ["", f"serving: ours (python -m phi3mlflow.serve, int4) / llama.cpp's server ({sv['gguf']}), "
                  f"{sv['requests']} streamed requests of up to {sv['max_tokens']} tokens, tokens/s ratio",
                  "", "| figure | median | min | max | TTFT p50 / p95 ours (ms) | TTFT p50 / p95 llama.cpp (ms) "
                  "| target | met |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, target in SERVE_TARGETS.items():
            r = sv[name]
            ours, theirs = r["ttft_ms"]["ours"], r["ttft_ms"]["llama.cpp"]
            lines.append(f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
                         f"{ours['p50']:.0f} / {ours['p95']:.0f} | {theirs['p50']:.0f} / {theirs['p95']:.0f} | "
                         f">= {target} | {'yes' if r['median'] >= target else 'no'} |")  # fmt: skip
        ratio = sv["serve_ttft_vs_llamacpp"]
        lines += [
            "",
            f"serve_ttft_vs_llamacpp (one client, p50 time to first token, ours / llama.cpp's): "
            f"{ratio:.2f}, target <= {SERVE_TTFT_TARGET}: {'met' if ratio <= SERVE_TTFT_TARGET else 'not met'}",
        ]
    return "\n".join(lines)
