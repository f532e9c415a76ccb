"""The question set: every row checked, with its number, before any model is loaded."""

from __future__ import annotations

import pytest

from phi3mlflow.errors import InputError
from phi3mlflow.evaluation.dataset import load_dataset


@pytest.mark.parametrize(
    "rows,needle",
    [
        ('{"question": "", "answer": "x"}', "row 2: question is empty"),
        ('{"question": "   ", "answer": "x"}', "row 2: question is empty"),
        ('{"question": 42, "answer": "x"}', "row 2: question is not text"),
        ('{"question": null, "answer": "x"}', "row 2: question is not text"),
        ('{"question": "Why?", "answer": ""}', "row 2: answer is missing"),
        ('{"question": "Why?", "answer": null}', "row 2: answer is missing"),
    ],
)
def test_every_dataset_row_is_checked_with_its_number(tmp_path, rows, needle):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "What is 2 plus 2?", "answer": "4 | four"}\n' + rows + "\n")
    with pytest.raises(InputError) as e:
        load_dataset(str(path), "question", "answer")
    assert e.value.parameter == "dataset" and needle in str(e.value) and "\n" not in str(e.value)


def test_a_category_column_is_kept_and_numeric_answers_are_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "What is 2 plus 2?", "answer": 4, "category": "arithmetic"}\n')
    df = load_dataset(str(path), "question", "answer")
    assert list(df.columns) == ["question", "expected", "category"] and df["expected"][0] == "4"


def test_the_real_question_set_is_valid():
    from phi3mlflow import DATA_DIR

    df = load_dataset(str(DATA_DIR / "real_questions.jsonl"), "question", "answer")
    assert len(df) >= 100 and df["question"].is_unique
    assert set(df["category"]) == {"geography", "science", "arithmetic", "language", "history"}


@pytest.mark.parametrize("answer,needle", [('["Paris", "paris"]', "must be text"), ('"|"', "no alias left"),
                                           ('"?"', "no alias left")])  # fmt: skip
def test_answers_must_be_text_with_an_alias(tmp_path, answer, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(f'{{"question": "What is the capital of France?", "answer": {answer}}}\n')
    with pytest.raises(InputError) as e:
        load_dataset(str(path), "question", "answer")
    assert e.value.parameter == "dataset" and "row 1" in str(e.value) and needle in str(e.value)
