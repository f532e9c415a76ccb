"""Distribution fidelity of an ONNX (ORT GenAI) candidate against the transformers reference.

Both models are teacher-forced on the reference's own answers (the question through the chat
template, then the answer tokens and the end token the reference stops on), and at every answer
position their next-token distributions are compared over the full vocabulary, as llama.cpp's
``llama-perplexity --kl-divergence`` measures quantised models: mean, 99th percentile and maximum
of KL(P_ref || P_cand), the share of positions where both pick the same top token, and the ratio
of the answers' perplexities. Unlike comparing generated texts, this sees a quantisation error
before it flips a greedy token, and an fp32 export that matches its source scores ~0.

:func:`compare` and :class:`Accumulator` are numpy only; the scorers wrap the two runtimes, and
:func:`measure` runs them in lockstep so that no reference log-probabilities are kept beyond the
sequence in hand (400 answers x 20 tokens x 49k vocabulary would be 1.5 GB).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

# Texts whose ids both tokenizers must agree on (besides a templated prompt): words, digits,
# punctuation, whitespace runs and non-ASCII, where byte-level and sentencepiece tokenizers differ.
PROBE_TEXTS = (
    "The capital of France is Paris.",
    "  Two  spaces, a tab\tand\nnew lines: 3.14159 x 42 = 131.95!",
    "Ünïcödé — naïve café, 東京, emoji 🙂.",
)
PROBE_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Fidelity:
    """How closely a candidate's next-token distributions follow the reference's on its answers."""

    kld_mean: float  # mean over all answer positions of KL(P_ref || P_cand), nats, full vocabulary
    kld_p99: float  # 99th percentile of the per-position KLD (numpy, linear)
    kld_max: float
    top1_agreement: float  # share of positions where both argmaxes are the same token
    ppl_ratio: float  # exp(mean NLL of the answer tokens under the candidate - the same under the reference)
    positions: int  # answer positions measured
    skipped: int = 0  # sequences left out (longer than the candidate's context)

    def metrics(self) -> dict[str, float]:
        return {
            "kld_mean": self.kld_mean,
            "kld_p99": self.kld_p99,
            "kld_max": self.kld_max,
            "top1_agreement": self.top1_agreement,
            "ppl_ratio": self.ppl_ratio,
        }


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (a new array); idempotent, so log-probabilities and logits both work."""
    out = np.array(x, dtype=np.float64)  # a copy, normalised in place: the same operations, fewer arrays
    out -= np.max(out, axis=-1, keepdims=True)
    out -= np.log(np.sum(np.exp(out), axis=-1, keepdims=True))
    return out


@dataclass(frozen=True)
class Reference:
    """One sequence's reference side, computed once for every candidate compared with it: the
    log-probabilities, their probabilities, each position's top token and the answer's NLL."""

    logprobs: np.ndarray  # [positions, vocab] float64, normalised
    probs: np.ndarray  # exp(logprobs)
    top: np.ndarray  # argmax per position
    targets: np.ndarray
    nll: float
    rules_out: bool  # some token has probability 0 (it then adds nothing to the divergence)

    @classmethod
    def of(cls, logprobs: np.ndarray, targets: np.ndarray | list[int], normalised: bool = False) -> Reference:
        """``logprobs`` ``[answer_len, vocab]`` (logits unless ``normalised``) and the answer ids."""
        lp = np.asarray(logprobs, dtype=np.float64) if normalised else log_softmax(logprobs)
        tgt = np.asarray(targets, dtype=np.int64).reshape(-1)
        if lp.ndim != 2:
            raise ValueError(f"log-probabilities must be [positions, vocab], got {lp.shape}")
        if lp.shape[0] != len(tgt):
            raise ValueError(f"positions differ: reference {lp.shape[0]}, targets {len(tgt)}")
        if len(tgt) and not (0 <= tgt.min() and tgt.max() < lp.shape[1]):
            raise ValueError(f"target ids must lie in [0, {lp.shape[1]})")
        probs = np.exp(lp)
        nll = -float(np.sum(lp[np.arange(len(tgt)), tgt]))
        return cls(lp, probs, np.argmax(lp, axis=-1), tgt, nll, bool(len(tgt) and probs.min() == 0.0))


class Accumulator:
    """:func:`compare`, one sequence at a time: keeps per-position KLDs and running sums only."""

    def __init__(self) -> None:
        self._kld: list[np.ndarray] = []
        self._agree = 0
        self._nll_ref = 0.0
        self._nll_cand = 0.0
        self._positions = 0
        self.skipped = 0

    def add(self, ref_lp: np.ndarray, cand_lp: np.ndarray, targets: np.ndarray | list[int]) -> None:
        """One sequence: ``[answer_len, vocab]`` log-probabilities (or logits) of both and the answer ids."""
        ref_lp, cand_lp = np.asarray(ref_lp), np.asarray(cand_lp)
        if ref_lp.ndim != 2 or cand_lp.ndim != 2:
            raise ValueError(f"log-probabilities must be [positions, vocab], got {ref_lp.shape} and {cand_lp.shape}")
        self.add_prepared(Reference.of(ref_lp, targets), log_softmax(cand_lp))

    def add_prepared(self, ref: Reference, cand: np.ndarray) -> None:
        """One sequence against its prepared reference: ``cand`` the candidate's normalised float64
        log-probabilities ``[answer_len, vocab]`` (what :func:`log_softmax` returns)."""
        if cand.ndim != 2:
            raise ValueError(f"log-probabilities must be [positions, vocab], got {cand.shape}")
        if ref.logprobs.shape[1] != cand.shape[1]:
            raise ValueError(f"vocabulary sizes differ: reference {ref.logprobs.shape[1]}, candidate {cand.shape[1]}")
        if ref.logprobs.shape[0] != cand.shape[0]:
            raise ValueError(
                f"positions differ: reference {ref.logprobs.shape[0]}, candidate {cand.shape[0]}, "
                f"targets {len(ref.targets)}"
            )
        with np.errstate(invalid="ignore"):
            terms = ref.logprobs - cand
            terms *= ref.probs
        if ref.rules_out:
            # 0 * log 0 = 0: a token the reference rules out adds nothing, whatever the candidate says.
            terms[ref.probs == 0.0] = 0.0
        kld = np.sum(terms, axis=-1)
        self._kld.append(np.maximum(kld, 0.0))  # float64 rounding may leave -1e-17 for equal rows
        self._agree += int(np.sum(ref.top == np.argmax(cand, axis=-1)))
        self._nll_ref += ref.nll
        self._nll_cand -= float(np.sum(cand[np.arange(len(ref.targets)), ref.targets]))
        self._positions += len(ref.targets)

    def result(self) -> Fidelity:
        """The figures so far; NaN throughout when no position was measured."""
        n = self._positions
        if n == 0:
            nan = float("nan")
            return Fidelity(nan, nan, nan, nan, nan, 0, self.skipped)
        kld = np.concatenate(self._kld)
        return Fidelity(
            kld_mean=float(np.mean(kld)),
            kld_p99=float(np.percentile(kld, 99)),
            kld_max=float(np.max(kld)),
            top1_agreement=self._agree / n,
            ppl_ratio=math.exp((self._nll_cand - self._nll_ref) / n),
            positions=n,
            skipped=self.skipped,
        )


def compare(ref_logprobs: list[np.ndarray], cand_logprobs: list[np.ndarray], targets: list[np.ndarray]) -> Fidelity:
    """Fidelity over sequences given whole: each item ``[answer_len, vocab]`` log-probabilities (or
    logits) and the answer ids. Raises ValueError when the lists, positions or vocabularies differ."""
    if not len(ref_logprobs) == len(cand_logprobs) == len(targets):
        raise ValueError(
            f"sequence counts differ: {len(ref_logprobs)} reference, {len(cand_logprobs)} candidate, {len(targets)}"
        )
    acc = Accumulator()
    for ref, cand, tgt in zip(ref_logprobs, cand_logprobs, targets, strict=True):
        acc.add(ref, cand, tgt)
    return acc.result()


class TransformersScorer:
    """The reference: a transformers causal LM and its tokenizer (e.g. the llm/v1/chat pipeline's
    ``.model`` and ``.tokenizer``)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos, list | tuple):
            eos = eos[0] if eos else None
        if eos is None:
            eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the reference model names no end token (generation_config.eos_token_id)")
        self.end_id = int(eos)  # what the reference stops on: the last answer token
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.seconds = 0.0  # spent in forward passes

    def prompt(self, question: str) -> list[int]:
        """The question as one user turn through the chat template, ready for the answer."""
        messages = [{"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        if len(ids) and not isinstance(ids[0], int):  # a batch of one
            ids = ids[0]
        return [int(i) for i in ids]

    def sequence(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Prompt ids and answer ids (the answer text, then the end token; just that for "")."""
        ids = self.tokenizer.encode(answer, add_special_tokens=False) if answer else []
        return self.prompt(question), [int(i) for i in ids] + [self.end_id]

    def answer(self, question: str, max_new_tokens: int = 48) -> str:
        """The reference's greedy answer (``model.generate``), special tokens dropped: what to score on."""
        import torch  # heavy: torch, off the fast path

        prompt = self.prompt(question)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=torch.tensor([prompt], dtype=torch.long),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        return self.tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)

    def logprobs(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """``[len(answer), vocab]`` float64 log-softmax predicting each answer token, one forward pass."""
        import torch  # heavy: torch, off the fast path

        start = time.perf_counter()
        ids = torch.tensor([list(prompt) + list(answer[:-1])], dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 :]
            out = torch.log_softmax(logits.to(torch.float64), dim=-1).numpy()
        self.seconds += time.perf_counter() - start
        return out


class GenAIScorer:
    """A candidate: an ORT GenAI model folder loaded by :class:`phi3mlflow.genai.GenAIChat`.

    By default one prefill of prompt + answer (less the last token) per sequence: ORT GenAI's raw
    ``logits`` output then holds every position's logits ([1, seq, vocab]), of which the answer's
    rows are kept, as llama.cpp's perplexity tool scores a batch. ``stepwise=True`` decodes the
    answer token by token instead (:meth:`logprobs_stepwise`), the path generation takes, at 2-7x
    the time. On fp32 the two agree to ~6e-5 in log-probability; on int8/int4 the quantised
    kernels for many rows and for one differ (SmolLM2, 30 answers: KL(stepwise || prefill)
    0.003), yet over 132 answers kld_mean moves by 0.02 % (int8) and 0.1 % (int4), top-1
    agreement by 0.5 points at most. An export whose output holds the last position only is
    decoded too.
    """

    def __init__(self, chat, stepwise: bool = False):
        self.chat = chat
        self.stepwise = stepwise
        self.og = chat.og
        self.model = chat.model
        self.context_length = int(chat.context_length)
        config = json.loads((chat.folder / "genai_config.json").read_text())
        self.vocab_size = int(config["model"]["vocab_size"])
        self.seconds = 0.0  # spent in forward passes

    def fits(self, prompt: list[int], answer: list[int]) -> bool:
        return len(prompt) + len(answer) <= self.context_length

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, batch_size=1, do_sample=False)
        return self.og.Generator(self.model, params)

    def logprobs(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """``[len(answer), vocab]`` float64 log-softmax predicting each answer token (one prefill,
        unless ``stepwise``)."""
        if not answer:
            raise ValueError("the answer must hold at least its end token")
        if not self.fits(prompt, answer):
            raise ValueError(f"{len(prompt) + len(answer)} tokens exceed the context of {self.context_length}")
        start = time.perf_counter()
        if self.stepwise:
            out = self.logprobs_stepwise(prompt, answer)
            self.seconds += time.perf_counter() - start
            return out
        ids = list(prompt) + list(answer[:-1])
        generator = self._generator(len(prompt) + len(answer))
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"))
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[0] == len(ids):
            out = log_softmax(logits[len(prompt) - 1 :])
        else:  # an export that keeps only the last position's logits: decode instead
            out = self.logprobs_stepwise(prompt, answer)
        self.seconds += time.perf_counter() - start
        return out

    def logprobs_stepwise(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """:meth:`logprobs` by decoding: the prompt, then one answer token at a time, as generation does."""
        generator = self._generator(len(prompt) + len(answer))
        generator.append_tokens(np.asarray(prompt, dtype=np.int32))
        rows = [np.asarray(generator.get_logits()).reshape(-1)]
        for token in answer[:-1]:
            generator.append_tokens(np.asarray([token], dtype=np.int32))
            rows.append(np.asarray(generator.get_logits()).reshape(-1))
        return log_softmax(np.stack(rows))


def same_tokenizer(reference: TransformersScorer, chat) -> bool:
    """Whether the ONNX model's ids mean what the reference's do: the same vocabulary size, the same
    ids for a templated prompt and for plain texts, and the reference's end token among its end
    tokens. Only then are its figures meaningful; a champion of another model is compared on
    answers alone."""
    config = json.loads((chat.folder / "genai_config.json").read_text())
    if int(config["model"]["vocab_size"]) != reference.vocab_size:
        return False
    if reference.end_id not in set(chat.tokenizer.eos_token_ids):
        return False
    messages = json.dumps([{"role": "user", "content": PROBE_QUESTION}])
    try:  # the prompt as the ONNX model is served it (GenAIChat.encode_messages)
        templated = chat.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template the other runtime cannot render is a mismatch
        return False
    pairs = [(chat.tokenizer.encode(templated), reference.prompt(PROBE_QUESTION))]
    pairs += [(chat.tokenizer.encode(text), reference.tokenizer.encode(text)) for text in PROBE_TEXTS]
    return all([int(i) for i in a] == [int(i) for i in b] for a, b in pairs)


def measure(
    reference: TransformersScorer,
    candidates: dict[str, GenAIScorer],
    questions: list[str],
    answers: list[str],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Fidelity]:
    """Fidelity of each candidate on the reference's answers, in lockstep: per (question, answer)
    one reference forward pass, then each candidate's, so only one sequence's log-probabilities
    are held. A sequence longer than a candidate's context is skipped for it and counted."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    accs = {name: Accumulator() for name in candidates}
    total = len(questions)
    for done, (question, answer) in enumerate(zip(questions, answers, strict=True), 1):
        prompt, ids = reference.sequence(question, answer)
        fitting = {name: c for name, c in candidates.items() if c.fits(prompt, ids)}
        for name in candidates.keys() - fitting.keys():
            accs[name].skipped += 1
        if fitting:
            # The reference's side once per sequence (its scorer returns normalised float64), not per candidate.
            ref = Reference.of(reference.logprobs(prompt, ids), ids, normalised=True)
            for name, candidate in fitting.items():
                accs[name].add_prepared(ref, candidate.logprobs(prompt, ids))
        if progress is not None:
            progress(done, total)
    return {name: acc.result() for name, acc in accs.items()}
