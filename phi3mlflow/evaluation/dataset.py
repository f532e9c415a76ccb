"""The question set: a JSONL or CSV file of questions and expected answers (aliases as ``a | b``),
with an optional ``category`` column; every row checked before any model is loaded."""

from __future__ import annotations

from pathlib import Path

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.errors import InputError
from phi3mlflow.metrics import aliases

# Relative to the project, like every path a profile or MLproject default names.
DEFAULT_DATASET = "data/questions.jsonl"
# An optional column of the dataset: accuracy is also reported per category.
CATEGORY_COLUMN = "category"


def _fail(param: str, message: str):
    raise InputError(param, message)


def load_dataset(path: str, question_column: str, answer_column: str):
    """The dataset as columns question, expected (and category when present), every row checked."""
    import pandas as pd  # heavy: only once a dataset is read

    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (PROJECT_ROOT / p).exists():
        p = PROJECT_ROOT / p
    if not p.is_file():
        _fail("dataset", f"no such file: {path}")
    try:
        if p.suffix.lower() == ".csv":
            df = pd.read_csv(p, dtype=str, keep_default_na=False)
        elif p.suffix.lower() in (".jsonl", ".json"):
            df = pd.read_json(p, lines=p.suffix.lower() == ".jsonl", dtype=False)
        else:
            _fail("dataset", f"expected a .jsonl, .json or .csv file, got {p.name}")
    except (ValueError, pd.errors.ParserError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError("dataset", f"cannot parse {path}: {str(e).splitlines()[0]}") from None
    if df.empty:
        _fail("dataset", f"{path} has no rows")
    for param, column in (("question_column", question_column), ("answer_column", answer_column)):
        if column not in df.columns:
            _fail(param, f"column {column!r} is not in {p.name} (columns: {', '.join(map(str, df.columns))})")
    for i, (q, a) in enumerate(zip(df[question_column], df[answer_column], strict=True), start=1):
        where = f"{p.name} row {i}"
        if not isinstance(q, str):
            _fail("dataset", f"{where}: {question_column} is not text (got {q!r})")
        if not q.strip():
            _fail("dataset", f"{where}: {question_column} is empty")
        if a is None or (isinstance(a, float) and a != a) or not str(a).strip():
            _fail("dataset", f"{where}: {answer_column} is missing")
        if not isinstance(a, str | int | float) or isinstance(a, bool):
            _fail("dataset", f"{where}: {answer_column} must be text (aliases as 'a | b'), got {a!r}")
        if aliases(str(a)) == [""]:
            _fail("dataset", f"{where}: {answer_column} {a!r} has no alias left after normalising")
    columns = {question_column: "question", answer_column: "expected"}
    if CATEGORY_COLUMN in df.columns and CATEGORY_COLUMN not in (question_column, answer_column):
        columns[CATEGORY_COLUMN] = "category"
        for i, cat in enumerate(df[CATEGORY_COLUMN], start=1):
            if isinstance(cat, bool) or not isinstance(cat, str | int | float) or not str(cat).strip():
                _fail("dataset", f"{p.name} row {i}: {CATEGORY_COLUMN} must be a non-empty text, got {cat!r}")
    out = df[list(columns)].rename(columns=columns)
    out["expected"] = out["expected"].astype(str)
    return out
