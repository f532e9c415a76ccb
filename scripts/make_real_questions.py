"""Build data/real_questions.jsonl: the hand-typed facts followed by seeded, computed arithmetic questions.

The file is made of two parts:

* ``data/real_questions_facts.jsonl`` - hand-typed rows (geography, science, language, history and the
  original arithmetic rows), copied verbatim, byte for byte, in order;
* generated rows, all with category ``arithmetic``: addition, subtraction, multiplication, exact division
  and unit conversions (centimeters in meters, minutes in hours, grams in kilograms, ...). Every answer is
  computed here, never typed, from ``random.Random(SEED)``, so the output is the same on every run.

Each answer lists its accepted aliases separated by " | ": the digits, the number in words below 100
("7 | seven", "42 | forty-two") and, from 1000 up, the digits with a thousands comma ("3000 | 3,000").
Generated questions never repeat an earlier question (normalised as phi3mlflow.metrics does, "7 times 6" counting
as "6 times 7"), and their answer never appears as a number in the question (so a model echoing the question
does not score).

Before writing, every row is checked: valid JSON with exactly the keys question, answer and category, non-empty
text, one of the five categories, no duplicate normalised question. Counts per category are printed.

Run from anywhere (python 3.11, standard library only):

    python scripts/make_real_questions.py          # (re)write data/real_questions.jsonl
    python scripts/make_real_questions.py --check  # exit 1 if the file on disk differs from what it would write

To add a fact, append a line to data/real_questions_facts.jsonl and rerun; to change the generated part,
change the counts or SEED below and rerun.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "data" / "real_questions_facts.jsonl"
OUTPUT = ROOT / "data" / "real_questions.jsonl"

SEED = 20240611
CATEGORIES = ("geography", "science", "arithmetic", "language", "history")
PER_OPERATION = 11  # addition, subtraction, multiplication and division questions each
CONVERSIONS = 12
# (smaller unit, larger unit, how many of the smaller make one of the larger)
UNITS = [
    ("centimeters", "meters", 100),
    ("millimeters", "centimeters", 10),
    ("meters", "kilometers", 1000),
    ("grams", "kilograms", 1000),
    ("milliliters", "liters", 1000),
    ("seconds", "minutes", 60),
    ("minutes", "hours", 60),
    ("hours", "days", 24),
    ("days", "weeks", 7),
    ("months", "years", 12),
]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
_ONES += "seventeen eighteen nineteen"
ONES = _ONES.split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def normalize(text: str) -> str:
    """Same normalisation as phi3mlflow.metrics.normalize (kept here so the script needs only the stdlib)."""
    return " ".join(_PUNCT.sub(" ", str(text).lower()).split())


def words(n: int) -> str:
    """English words for 0 <= n < 100: 7 -> "seven", 42 -> "forty-two"."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def number_answer(n: int) -> str:
    """The aliases of a whole-number answer: "7 | seven", "42 | forty-two", "300", "3000 | 3,000"."""
    if n < 100:
        return f"{n} | {words(n)}"
    if n >= 1000:
        return f"{n} | {n:,}"
    return str(n)


_SUM = re.compile(r"what is (\d+) (plus|minus|times|divided by) (\d+)")


def question_key(question: str) -> str:
    """What makes two questions the same: the normalised text, with the operands of plus and times sorted
    ("What is 7 times 6?" repeats "What is 6 times 7?")."""
    text = normalize(question)
    found = _SUM.fullmatch(text)
    if found and found[2] in ("plus", "times"):
        a, b = sorted((int(found[1]), int(found[3])))
        return f"what is {a} {found[2]} {b}"
    return text


def _operation(rng: random.Random, kind: str) -> tuple[str, int]:
    if kind == "plus":
        a, b = rng.randint(2, 50), rng.randint(2, 50)
        return f"What is {a} plus {b}?", a + b
    if kind == "minus":
        a = rng.randint(10, 99)
        b = rng.randint(2, a - 2)
        return f"What is {a} minus {b}?", a - b
    if kind == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", a * b
    divisor, quotient = rng.randint(2, 10), rng.randint(2, 12)
    return f"What is {divisor * quotient} divided by {divisor}?", quotient


def _conversion(rng: random.Random, i: int) -> tuple[str, int]:
    small, large, factor = UNITS[i % len(UNITS)]
    amount = rng.randint(2, 9)
    return f"How many {small} are in {amount} {large}?", amount * factor


def generated_rows(taken: set[str]) -> list[dict[str, str]]:
    """The computed rows, deterministic for SEED; ``taken`` holds the question_key of the questions already used."""
    rng = random.Random(SEED)
    plan = [(kind, i) for kind in ("plus", "minus", "times", "divided") for i in range(PER_OPERATION)]
    plan += [("convert", i) for i in range(CONVERSIONS)]
    rows, seen = [], set(taken)
    for kind, i in plan:
        while True:
            question, answer = _conversion(rng, i) if kind == "convert" else _operation(rng, kind)
            in_question = re.findall(r"\d+", question)
            if question_key(question) not in seen and str(answer) not in in_question:
                break
        seen.add(question_key(question))
        rows.append({"question": question, "answer": number_answer(answer), "category": "arithmetic"})
    return rows


def validate(text: str) -> Counter[str]:
    """Check every line of the dataset; the counts per category, or SystemExit naming the first bad line."""
    counts: Counter[str] = Counter()
    seen: dict[str, int] = {}
    for i, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"line {i}: not JSON ({e})") from None
        if not isinstance(row, dict) or set(row) != {"question", "answer", "category"}:
            raise SystemExit(f"line {i}: expected the keys question, answer, category: {line}")
        for key in ("question", "answer"):
            if not isinstance(row[key], str) or not row[key].strip():
                raise SystemExit(f"line {i}: empty or non-text {key}: {line}")
        if row["category"] not in CATEGORIES:
            raise SystemExit(f"line {i}: category {row['category']!r} is not one of {', '.join(CATEGORIES)}")
        if any(not normalize(alias) for alias in row["answer"].split("|")):
            raise SystemExit(f"line {i}: an empty alias in {row['answer']!r}")
        key = normalize(row["question"])
        if key in seen:
            raise SystemExit(f"line {i}: the same question as line {seen[key]}: {row['question']!r}")
        seen[key] = i
        counts[row["category"]] += 1
    return counts


def build() -> tuple[str, int, int]:
    """The whole file (the facts' text verbatim, then one JSON line per generated row), how many facts and
    how many generated rows."""
    facts = FACTS.read_text(encoding="utf-8")
    if facts and not facts.endswith("\n"):
        facts += "\n"
    validate(facts)
    questions = [json.loads(line)["question"] for line in facts.splitlines()]
    rows = generated_rows({question_key(q) for q in questions})
    return facts + "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), len(questions), len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file on disk differs, write nothing")
    args = parser.parse_args(argv)
    text, n_facts, n_generated = build()
    counts = validate(text)
    name = OUTPUT.relative_to(ROOT)
    if args.check:
        current = OUTPUT.read_bytes() if OUTPUT.is_file() else b""
        if current != text.encode("utf-8"):
            print(f"{name} is out of date: run python scripts/make_real_questions.py", file=sys.stderr)
            return 1
        print(f"{name} is up to date ({sum(counts.values())} questions)")
        return 0
    OUTPUT.write_bytes(text.encode("utf-8"))
    print(f"wrote {name}: {sum(counts.values())} questions ({n_facts} hand-typed, {n_generated} generated)")
    for category in CATEGORIES:
        print(f"  {category:<10} {counts[category]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
