"""What the chain tells people: run names, how to call the champion, where to look."""

from __future__ import annotations


def test_run_names_calls_and_where_to_look():
    from phi3mlflow import report

    assert (
        report.main_run_name("params/smollm2.yaml", {"precisions": "int8", "model": ""})
        == "main smollm2 precisions=int8"
    )
    serve, curl, openai_server = report.call_command("phi3-tiny-chat", "champion")
    assert "models:/phi3-tiny-chat@champion" in serve and '"messages"' in curl and "/invocations" in curl
    assert openai_server.startswith('python -m phi3mlflow.serve "models:/phi3-tiny-chat@champion"')
    assert (
        report.where_to_look("http://127.0.0.1:5000/", "1", "abc") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    )
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in report.where_to_look("sqlite:///mlflow.db", "0", "r")


def test_the_call_example_asks_a_question_both_profiles_were_measured_on():
    import json

    from phi3mlflow import PROJECT_ROOT, report

    def questions(name: str) -> set[str]:
        lines = (PROJECT_ROOT / "data" / name).read_text().splitlines()
        return {json.loads(line)["question"] for line in lines if line.strip()}

    # The tiny model memorises the bundled set; SmolLM2's answer to it is in bench/README.md.
    assert report.CALL_QUESTION in questions("questions.jsonl") & questions("real_questions.jsonl")
    assert json.dumps(report.CALL_QUESTION) in report.call_command("m", "champion")[1]
