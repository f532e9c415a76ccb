"""How main records a step that died without a Python error (killed from outside, out of memory):
its signal or exit status on the step's run and in main's error, the run ended FAILED. The launched
step and the tracking client are small stand-ins; the chain's own logic is what runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from phi3mlflow import tags
from phi3mlflow.chain import Chain, StepFailed


class Client:
    def __init__(self, run_tags: dict):
        self.tags, self.status = dict(run_tags), "RUNNING"

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(tags=dict(self.tags)), info=SimpleNamespace(status=self.status))

    def set_tag(self, run_id, key, value):
        self.tags[key] = value

    def set_terminated(self, run_id, status):
        self.status = status


class Launched:
    def __init__(self, returncode: int, interrupt: bool = False):
        self.run_id, self.command_proc, self.interrupt, self.cancelled = (
            "r1",
            SimpleNamespace(returncode=returncode),
            (interrupt),
            False,
        )

    def wait(self):
        if self.interrupt:
            raise KeyboardInterrupt
        return self.command_proc.returncode == 0

    def cancel(self):
        self.cancelled = True


def chain(client) -> Chain:
    c = Chain.__new__(Chain)
    c.client = client
    return c


@pytest.mark.parametrize("code,how", [(-9, "killed by SIGKILL"), (137, "killed by SIGKILL"), (-15, "killed by SIGTERM"),
                                      (3, "exited with status 3")])  # fmt: skip
def test_a_step_killed_from_outside_is_recorded_on_its_run_and_in_the_error(code, how):
    client = Client({})
    with pytest.raises(StepFailed) as e:
        chain(client)._wait("evaluate", Launched(code))
    assert how in str(e.value) and "step evaluate failed (run r1)" in str(e.value)
    assert client.tags[tags.EXIT] == how and how in client.tags[tags.ERROR] and client.status == "FAILED"


def test_a_step_that_recorded_its_own_cause_keeps_it():
    client = Client({tags.ERROR: "dataset: no such file: x.csv"})
    with pytest.raises(StepFailed) as e:
        chain(client)._wait("evaluate", Launched(2))
    assert "dataset: no such file: x.csv (exited with status 2)" in str(e.value)
    assert client.tags[tags.ERROR] == "dataset: no such file: x.csv"


def test_a_cancelled_chain_stops_its_step_and_ends_its_run():
    client, launched = Client({}), Launched(0, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        chain(client)._wait("evaluate", launched)
    assert launched.cancelled and client.status == "FAILED" and "KeyboardInterrupt" in client.tags[tags.ERROR]


def test_a_cancelled_step_keeps_the_cause_it_recorded_itself():
    client, launched = Client({tags.ERROR: "cancelled by SIGTERM"}), Launched(0, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        chain(client)._wait("evaluate", launched)
    assert client.tags[tags.ERROR] == "cancelled by SIGTERM"


def test_a_step_that_succeeded_but_left_its_run_open_is_ended():
    client = Client({})
    chain(client)._wait("evaluate", Launched(0))
    assert client.status == "FINISHED" and tags.ERROR not in client.tags


def test_a_killed_step_has_its_last_stderr_lines_on_its_run_and_in_the_error():
    client = Client({})
    tail = "loading model\nanswering 12/40\nonnxruntime: allocating 3 GB"
    with pytest.raises(StepFailed) as e:
        chain(client)._wait("evaluate", Launched(-9), lambda: tail)
    assert str(e.value) == ("step evaluate failed (run r1): the step was killed by SIGKILL, with no error of its own; "
                            "its stderr ended: onnxruntime: allocating 3 GB")  # fmt: skip
    assert client.tags[tags.STDERR_TAIL] == tail and client.tags[tags.EXIT] == "killed by SIGKILL"
    assert tail in client.tags["mlflow.note.content"] and client.status == "FAILED"


def test_a_step_with_its_own_cause_keeps_it_in_the_error_and_its_tail_on_the_run():
    client = Client({tags.ERROR: "dataset: no such file: x.csv"})
    with pytest.raises(StepFailed) as e:
        chain(client)._wait("evaluate", Launched(2), lambda: "Traceback ...\nerror: dataset: no such file: x.csv")
    assert str(e.value).endswith("dataset: no such file: x.csv (exited with status 2)")
    assert client.tags[tags.STDERR_TAIL].endswith("error: dataset: no such file: x.csv")
