"""The decision rules (phi3mlflow/summary.py) and the alias gate (phi3mlflow/registry.py): goals as a
non-inferiority margin, ties within the noise decided on time, the champion challenged on the same
questions, and nothing decided from numbers another run stored."""

from __future__ import annotations

import json

import pytest

from phi3mlflow import registry
from phi3mlflow.summary import Candidate, Goals, Summary, build, verdict

N = 100


def right(k: int, offset: int = 0) -> list[float]:
    """``k`` of N questions right, starting at question ``offset`` (wrapping)."""
    return [1.0 if (i - offset) % N < k else 0.0 for i in range(N)]


def cand(key: str, correct: list[float], ms: float) -> Candidate:
    wrapper, precision = ("chat", "fp32") if key == "chat" else ("onnx", key.split("_", 1)[-1])
    acc = sum(correct) / len(correct)
    return Candidate.scored(key, wrapper, precision, f"models:/m-{key}", {
        "accuracy": acc, "exact_match": acc, "f1": acc, "latency_p50_ms": ms, "latency_p95_ms": ms,
        "tokens_per_s": 1000 / ms, "ms_per_question": ms}, model_id=f"m-{key}")  # fmt: skip


DEFAULT_GOALS = Goals(0.3, 0.05)


def decide(models: dict[str, tuple[list[float], float]], goals=DEFAULT_GOALS, reference="chat", metric="accuracy",
           champion=None, version=None, error="") -> Summary:  # fmt: skip
    candidates = [cand(k, c, ms) for k, (c, ms) in models.items()]
    scores = {k: {m: c for m in ("accuracy", "exact_match", "f1")} for k, (c, _) in models.items()}
    return build(candidates, metric, goals, reference if reference in models else None, scores,
                 champion=champion, champion_version=version, champion_error=error)  # fmt: skip


def test_candidates_tied_within_the_noise_go_to_the_fastest():
    # fp32 and int8 differ by 3 questions (inside the noise): int8 is faster and wins.
    s = decide({"chat": (right(62), 300.0), "onnx_fp32": (right(62), 40.0), "onnx_int8": (right(65, 3), 25.0)})
    assert s.winner == "onnx_int8" and set(s.tied) == {"onnx_fp32", "chat"}
    assert [c.rank for c in s.candidates] == [1, 2, 3]
    assert "tied within the noise" in verdict(s)


def test_a_significantly_better_candidate_wins_although_slower():
    s = decide({"chat": (right(90), 300.0), "onnx_int4": (right(40), 10.0)}, goals=Goals(0.3, 1.0))
    assert s.winner == "chat" and s.tied == []
    assert "significantly ahead of onnx_int4" in verdict(s)


def test_max_accuracy_drop_is_a_non_inferiority_margin_on_the_interval():
    # 5 fewer right of 100 (point drop 0.05 = the margin), but the interval's low end is far below -0.05.
    s = decide({"chat": (right(60), 300.0), "onnx_int4": (right(55), 10.0)})
    assert not s["onnx_int4"].meets_goals and "may lose more than max_accuracy_drop 0.05" in s["onnx_int4"].missed
    assert "95 % CI" in s["onnx_int4"].missed and s.winner == "chat"
    # The same answers: a candidate that agrees with the reference on every question meets any margin.
    same = decide({"chat": (right(60), 300.0), "onnx_fp32": (right(60), 40.0)}, goals=Goals(0.3, 0.0))
    assert same["onnx_fp32"].meets_goals and same.winner == "onnx_fp32"


def test_min_accuracy_and_max_kld_refuse():
    s = decide({"chat": (right(20), 300.0), "onnx_int4": (right(20), 10.0)})
    assert "min_accuracy" in s["chat"].missed and not s.alias_should_move
    assert verdict(s).startswith("no candidate meets the goals")
    k = decide({"chat": (right(60), 300.0), "onnx_int4": (right(60), 10.0)}, goals=Goals(0.3, 0.05, max_kld=0.1))
    assert k["onnx_int4"].meets_goals  # no fidelity figures: the ceiling has nothing to refuse
    c = k["onnx_int4"]
    c.fidelity = {"kld_mean": 0.2}
    from phi3mlflow.summary import missed_goals

    assert "max_kld 0.1" in missed_goals(c, Goals(0.3, 0.05, max_kld=0.1))


def test_without_an_alias_holder_a_winner_that_meets_the_goals_moves_it():
    s = decide({"chat": (right(60), 300.0), "onnx_int8": (right(60), 20.0)})
    assert s.alias_should_move and "no version holds the alias" in s.alias_reason


def test_a_champion_within_the_noise_keeps_the_alias_unless_much_slower():
    models = {"chat": (right(60), 300.0), "onnx_int8": (right(61, 1), 20.0), "champion": (right(60), 21.0)}
    s = decide(models, champion="champion", version="3")
    assert s.winner == "onnx_int8" and not s.alias_should_move
    assert s.alias_reason.startswith("tied with version 3: Δ accuracy +0.010, 95 % CI")
    slow = dict(models, champion=(right(60), 40.0))
    s = decide(slow, champion="champion", version="3")
    assert s.alias_should_move and "faster by more than 25% in this run and by more than 5 ms" in s.alias_reason
    # A challenger 30 % faster by less than TIE_FLOOR_MS per question: the timer's grain, it stays.
    tiny = decide({"chat": (right(60), 300.0), "onnx_int8": (right(61, 1), 1.4), "champion": (right(60), 2.0)},
                  champion="champion", version="3")  # fmt: skip
    assert not tiny.alias_should_move and "no speed gain beyond 25% and 5 ms per question" in tiny.alias_reason


def test_a_champion_significantly_better_or_worse_decides():
    better = decide({"chat": (right(60), 300.0), "onnx_int8": (right(60), 20.0), "champion": (right(20), 20.0)},
                    goals=Goals(0.1, 1.0), champion="champion", version="3")  # fmt: skip
    assert better.alias_should_move and "beats version 3 on the same questions" in better.alias_reason
    worse = decide({"chat": (right(60), 300.0), "onnx_int8": (right(60), 5.0), "champion": (right(95), 50.0)},
                   goals=Goals(0.1, 1.0), champion="champion", version="3")  # fmt: skip
    # The champion is no challenger: the winner is the best challenger, and it loses to the champion.
    assert worse.winner != "champion" and not worse.alias_should_move and "worse than version 3" in worse.alias_reason


def test_the_champion_as_one_of_the_candidates_stays_when_it_wins_again():
    s = decide({"chat": (right(60), 300.0), "onnx_int4": (right(60), 10.0)}, champion="onnx_int4", version="5")
    assert s.winner == "onnx_int4" and not s.alias_should_move and "is version 5 itself" in s.alias_reason


def test_a_tie_within_the_timing_noise_stays_with_the_champion_among_the_candidates():
    # An identical rerun: the champion (onnx_int4, one of the candidates) and onnx_int8 tie on the same
    # answers, and int8 is 10 % faster this time: timing noise, so int4 stays first, and register
    # finds nothing new to register. 30 % faster is beyond the noise: int8 wins the tie.
    models = {"chat": (right(60), 300.0), "onnx_int4": (right(60), 100.0), "onnx_int8": (right(60), 90.0)}
    s = decide(models, champion="onnx_int4", version="5")
    assert s.winner == "onnx_int4" and s.tied == ["onnx_int8", "chat"] and "is version 5 itself" in s.alias_reason
    fast = decide(dict(models, onnx_int8=(right(60), 70.0)), champion="onnx_int4", version="5")
    assert fast.winner == "onnx_int8" and fast.alias_should_move
    # On the tiny model's times, 30 % is a millisecond: within the timer's grain (TIE_FLOOR_MS), int4 stays.
    tiny = {"chat": (right(60), 300.0), "onnx_int4": (right(60), 2.0), "onnx_int8": (right(60), 1.4)}
    assert decide(tiny, champion="onnx_int4", version="5").winner == "onnx_int4"
    # Without a champion among them, the tie goes to the fastest, as before.
    assert decide(models).winner == "onnx_int8"


def test_an_unloadable_champion_is_said_and_replaced():
    s = decide({"chat": (right(60), 300.0), "onnx_int4": (right(60), 10.0)}, version="5",
               error="@champion (version 5) cannot be loaded: no such file")  # fmt: skip
    assert s.alias_should_move and "cannot be loaded" in s.alias_reason


def test_the_summary_survives_its_json_round_trip_and_the_same_answers_decide_the_same():
    models = {"chat": (right(60), 300.0), "onnx_int8": (right(61, 1), 20.0), "champion": (right(59, 2), 21.0)}
    a = decide(models, champion="champion", version="3")
    b = decide(models, champion="champion", version="3")
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    assert Summary.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_a_speed_metric_ranks_by_value():
    s = decide({"chat": (right(60), 300.0), "onnx_int4": (right(60), 10.0)}, metric="latency_p50_ms")
    assert s.best == "onnx_int4" and s.tied == []


@pytest.mark.parametrize(
    "holder,force,moves,says",
    [
        ("3", False, False, "tied with version 3"),
        ("4", False, False, "challenged version 3, but the alias now points to version 4"),
        (None, False, False, "now points to no version"),
        ("4", True, True, "force=true"),
    ],
)
def test_the_gate_acts_on_the_evaluations_own_verdict(holder, force, moves, says):
    s = decide({"chat": (right(60), 300.0), "onnx_int8": (right(61, 1), 20.0), "champion": (right(60), 21.0)},
               champion="champion", version="3")  # fmt: skip
    decision = registry.gate(s, registry.choose(s), force, holder)
    assert decision.move is moves and says in decision.reason


def test_a_failing_choice_never_moves_the_alias_without_force():
    s = decide({"chat": (right(20), 300.0), "onnx_int4": (right(10), 10.0)})
    choice = registry.choose(s)
    assert not choice.passes and not registry.gate(s, choice, False, None).move
    assert registry.gate(s, choice, True, None).move
