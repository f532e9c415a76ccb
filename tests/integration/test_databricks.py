"""Databricks: the ``-b databricks`` submission through MLflow's real code against a loopback fake of
the workspace, and the scheduled-job bundle validated with Databricks' own job model."""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import pytest
import yaml

from phi3mlflow.tracking import requirement_pins
from tests.integration.databricks_fake import JOB_RUN_ID, FakeWorkspace
from tests.support import ROOT, one_line_error

TOKEN = "dapi-test-" + os.urandom(8).hex()
HUB_TOKEN = "hf_test_" + os.urandom(8).hex()
UC_NAME = "main.default.phi3_chat"
# Untracked files .gitignore does not exclude: written after the commit, so git sees them as new.
UNTRACKED = {".envrc": f"export DATABRICKS_TOKEN={TOKEN}\n", ".env.local": f"HF_TOKEN={HUB_TOKEN}\n",
             ".netrc": f"machine x login y password {TOKEN}\n", "notes/token.txt": f"{TOKEN}\n",
             "notes/extra.txt": "a harmless note\n"}  # fmt: skip


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """The working tree as a user's checkout: its project files committed, plus the litter a checkout
    gathers: ignored (a venv, a tracking database, caches, a .env holding the token) and untracked but
    not ignored (shell and netrc files, notes holding tokens, a harmless note)."""
    dest = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
                           capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((ROOT / rel).read_bytes())
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "checkout"], check=True)
    litter = {".venv/bin/python": "venv", "mlflow.db": "sqlite", "mlruns/0/meta.yaml": "runs",
              ".env": f"DATABRICKS_TOKEN={TOKEN}\nHF_TOKEN={HUB_TOKEN}\n", "outputs/answers.json": "{}",
              "steps/__pycache__/main.cpython-311.pyc": "pyc", **UNTRACKED}  # fmt: skip
    for rel, text in litter.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    return dest


def _submit(checkout, tracking_uri, *args: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "MLFLOW_EXPERIMENT"))}
    with FakeWorkspace(TOKEN, tracking_uri) as ws:
        env |= {"MLFLOW_TRACKING_URI": "databricks", "DATABRICKS_HOST": ws.url, "DATABRICKS_TOKEN": TOKEN,
                "HF_TOKEN": HUB_TOKEN}  # fmt: skip
        proc = subprocess.run([sys.executable, "scripts/databricks_submit.py", *args], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, ws.recorded


def _tarball(rec) -> dict[str, bytes]:
    [data] = rec.files.values()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _tracked(checkout) -> set[str]:
    return set(subprocess.run(["git", "-C", str(checkout), "ls-files", "-z"], capture_output=True, text=True,
                              check=True).stdout.split("\0")) - {""}  # fmt: skip


@pytest.fixture(scope="module")
def submission(checkout, tracking_uri):
    return _submit(checkout, tracking_uri, "-e", "main", "--experiment-name", "/Shared/phi3-mlflow",
                   "-P", f"registered_model_name={UC_NAME}", "-P", "precisions=int8,int4")  # fmt: skip


@pytest.mark.slow
def test_submission_goes_through_mlflows_databricks_backend(submission):
    proc, rec = submission
    assert f"Launched MLflow run as Databricks job run with ID {JOB_RUN_ID}" in proc.stderr
    assert rec.unauthorised == [] and rec.unexpected == []
    assert ("POST", "/api/2.0/jobs/runs/submit") in rec.requests
    assert len(rec.submitted) == 1 and len(rec.files) == 1


@pytest.mark.slow
def test_submitted_job_runs_main_on_the_pinned_cluster(submission, checkout):
    _, rec = submission
    [job] = rec.submitted
    config = json.loads((ROOT / "deploy" / "cluster.json").read_text())
    assert job["new_cluster"] == config["new_cluster"]
    # MLflow adds its own pin; with it, the cluster gets exactly requirements.txt.
    packages = [lib["pypi"]["package"] for lib in job["libraries"]]
    assert sorted(packages) == sorted(requirement_pins().values()) and len(packages) == len(set(packages))
    # Internal options of mlflow run must not leak into the cluster spec.
    assert not any(k.isupper() for k in job["new_cluster"])
    task = job["shell_command_task"]
    assert set(task["env_vars"]) == {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"}
    assert task["env_vars"]["MLFLOW_TRACKING_URI"] == "databricks"
    bash, flag, script = task["command"]
    assert (bash, flag) == ("bash", "-c")
    [upload] = rec.files
    assert f"/dbfs{upload}" in script
    run_line = next(line for line in script.splitlines() if line.strip().startswith("mlflow run"))
    argv = shlex.split(run_line)
    assert argv[argv.index("--entry-point") + 1] == "main"
    assert argv[argv.index("--env-manager") + 1] == "local"
    params = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-P")
    assert params == {"registered_model_name": UC_NAME, "precisions": "int8,int4"}


@pytest.mark.slow
def test_uploaded_tarball_is_the_project_and_nothing_else(submission, checkout):
    proc, rec = submission
    tarball = _tarball(rec)
    names, contents = set(tarball), b"".join(tarball.values())
    # The litter really is untracked and not ignored, so only the rule "tracked files only" keeps it out.
    assert set(UNTRACKED) <= set(subprocess.run(["git", "-C", str(checkout), "ls-files", "-o", "--exclude-standard"],
                                                capture_output=True, text=True, check=True).stdout.split())  # fmt: skip
    assert names == _tracked(checkout)
    assert {"MLproject", "steps/main.py", "deploy/cluster.json", "data/questions.jsonl"} <= names
    for litter in (".venv", "mlflow.db", "mlruns", ".env", ".netrc", "notes/", "__pycache__", "outputs", ".git/"):
        assert not any(n.startswith(litter) or f"/{litter}" in n for n in names), litter
    assert TOKEN.encode() not in contents and HUB_TOKEN.encode() not in contents
    # The user is told what stayed home.
    [line] = [line for line in proc.stdout.splitlines() if "untracked files left out" in line]
    assert f" {len(UNTRACKED)} untracked files left out" in line and ".envrc" in line


@pytest.mark.slow
def test_include_uploads_a_named_untracked_file_and_only_that(checkout, tracking_uri):
    args = ["--include", "notes/extra.txt", "-e", "main", "--experiment-name", "/Shared/phi3-mlflow-include"]
    _, rec = _submit(checkout, tracking_uri, *args, "-P", f"registered_model_name={UC_NAME}")
    tarball = _tarball(rec)
    assert set(tarball) == _tracked(checkout) | {"notes/extra.txt"}
    assert tarball["notes/extra.txt"] == UNTRACKED["notes/extra.txt"].encode()
    contents = b"".join(tarball.values())
    assert TOKEN.encode() not in contents and HUB_TOKEN.encode() not in contents
    # --include is the script's own option: it does not reach mlflow run.
    script = rec.submitted[0]["shell_command_task"]["command"][2]
    assert "--include" not in script and "extra.txt" not in script


@pytest.mark.slow
def test_run_is_recorded_and_secrets_are_nowhere(submission, tracking_uri):
    import mlflow

    proc, rec = submission
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("/Shared/phi3-mlflow")
    [run] = client.search_runs([exp.experiment_id])
    tags = run.data.tags
    assert tags["mlflow.project.backend"] == "databricks"
    assert tags["mlflow.databricks.runURL"].endswith(f"/run/{JOB_RUN_ID}")
    assert run.data.params["registered_model_name"] == UC_NAME
    # The job continues this very run, so the cluster's results land on it.
    script = rec.submitted[0]["shell_command_task"]["command"][2]
    argv = shlex.split(next(line for line in script.splitlines() if line.strip().startswith("mlflow run")))
    assert list(json.loads(argv[argv.index("-c") + 1]).values()) == [run.info.run_id]
    recorded = json.dumps({"params": run.data.params, "tags": tags}) + proc.stdout + proc.stderr
    assert TOKEN not in recorded and HUB_TOKEN not in recorded


def _bundle() -> dict:
    return yaml.safe_load((ROOT / "databricks.yml").read_text())


def _jobs() -> dict:
    return _bundle()["resources"]["jobs"]


def test_bundle_jobs_pass_databricks_own_job_model():
    from databricks.bundles.jobs import Job

    assert _jobs()
    for job in _jobs().values():
        Job.from_dict(job)
    # The validator is strict, so a pass means something: a misspelt key or a bad enum is refused.
    job = next(iter(_jobs().values()))
    with pytest.raises(ValueError, match="spark_python_tsk"):
        Job.from_dict({**job, "tasks": [{"task_key": "t", "spark_python_tsk": {}}]})
    with pytest.raises(ValueError, match="SOMETIMES"):
        Job.from_dict({**job, "schedule": {**job["schedule"], "pause_status": "SOMETIMES"}})


def test_bundle_references_resolve_and_libraries_are_our_pins():
    bundle = _bundle()
    used = set(re.findall(r"\$\{var\.(\w+)\}", (ROOT / "databricks.yml").read_text()))
    assert used <= set(bundle["variables"]), used - set(bundle["variables"])
    for job in _jobs().values():
        clusters = {c["job_cluster_key"] for c in job["job_clusters"]}
        tasks = {t["task_key"] for t in job["tasks"]}
        params = {p["name"] for p in job["parameters"]}
        fields = job["schedule"]["quartz_cron_expression"].split()
        assert 6 <= len(fields) <= 7 and job["schedule"]["timezone_id"]
        for task in job["tasks"]:
            assert (ROOT / task["spark_python_task"]["python_file"]).is_file()
            assert task["job_cluster_key"] in clusters
            assert {d["task_key"] for d in task.get("depends_on", [])} <= tasks - {task["task_key"]}
            refs = set(re.findall(r"\{\{job\.parameters\.(\w+)\}\}", json.dumps(task)))
            assert refs <= params, refs - params
            assert sorted(lib["pypi"]["package"] for lib in task["libraries"]) == sorted(requirement_pins().values())


def test_bundle_chain_task_with_default_parameters_is_a_valid_unity_catalog_plan(monkeypatch):
    from phi3mlflow.registry import check_names
    from steps import main

    variables = {k: v["default"] for k, v in _bundle()["variables"].items()}

    def resolve(text: str) -> str:
        return re.sub(r"\$\{var\.(\w+)\}", lambda m: variables[m.group(1)], text)

    job = _jobs()["phi3_chain"]
    defaults = {p["name"]: resolve(p["default"]) for p in job["parameters"]}
    # Every flag of main is a job parameter, so a run can override any of them.
    assert set(defaults) == {"params_file", *main.OVERRIDES}
    [task] = [t for t in job["tasks"] if t["spark_python_task"]["python_file"] == "deploy/run_chain.py"]
    argv = [re.sub(r"\{\{job\.parameters\.(\w+)\}\}", lambda m: defaults[m.group(1)], a)
            for a in task["spark_python_task"]["parameters"]]  # fmt: skip
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "databricks-uc")
    monkeypatch.chdir(ROOT)
    values = main.plan(main.parse_args(argv))
    assert values["registered_model_name"].count(".") == 2
    check_names(values["registered_model_name"], values["alias"], "databricks-uc")
    env = job["job_clusters"][0]["new_cluster"]["spark_env_vars"]
    assert env["MLFLOW_REGISTRY_URI"] == "databricks-uc" and resolve(env["MLFLOW_EXPERIMENT_NAME"]).startswith("/")


def test_job_entry_point_runs_main_from_any_working_directory(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "run_chain.py"), "--params_file", "nope.yaml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    line = one_line_error(proc)
    assert line.startswith("error: params_file: no such profile"), line


def _repo(tmp_path):
    """A small repository: tracked files (one deleted since), untracked ones, ignored ones."""
    root = tmp_path / "repo"
    for rel, text in {"a.txt": "a", "sub/b.txt": "b", "gone.txt": "g", ".gitignore": "*.log\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "repo"], check=True)
    (root / "gone.txt").unlink()
    for rel in (".envrc", ".netrc", "notes/token.txt", "notes/extra.txt", "run.log"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(TOKEN)
    (tmp_path / "outside.txt").write_text("outside")
    return root


def test_file_selection_is_tracked_files_plus_named_ones(tmp_path):
    from scripts.databricks_submit import project_files, split_args, stage, untracked_files

    root = _repo(tmp_path)
    assert project_files(root) == [".gitignore", "a.txt", "sub/b.txt"]
    assert untracked_files(root) == [".envrc", ".netrc", "notes/extra.txt", "notes/token.txt"]
    included = project_files(root, ["notes/extra.txt", "./sub/../run.log", "a.txt"])
    assert included == [".gitignore", "a.txt", "notes/extra.txt", "run.log", "sub/b.txt"]
    dest = tmp_path / "stage"
    expected = [".gitignore", "a.txt", "notes/extra.txt", "sub/b.txt"]
    assert stage(root, dest, ["notes/extra.txt"]) == expected
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == expected
    argv = ["-e", "main", "--include", "x", "-P", "a=--include", "--include=y", "--backend-config", "c.json"]
    assert split_args(argv) == (["x", "y"], ["-e", "main", "-P", "a=--include", "--backend-config", "c.json"])
    with pytest.raises(ValueError, match="needs a path"):
        split_args(["-e", "main", "--include"])


@pytest.mark.parametrize(
    ("path", "why"),
    [("../outside.txt", "outside the repository"), ("OUTSIDE", "outside the repository"),
     ("notes/missing.txt", "no such file"), ("gone.txt", "no such file"), ("notes", "not a file"),
     (".git/config", "not a file of the project"), (".", "not a file of the project"), ("", "empty path"),
     ("notes/link.txt", "leads outside the repository")],
)  # fmt: skip
def test_file_selection_refuses_a_path_that_is_not_a_file_of_the_repository(tmp_path, path, why):
    from scripts.databricks_submit import project_files

    root = _repo(tmp_path)
    (root / "notes" / "link.txt").symlink_to(tmp_path / "outside.txt")
    path = str(tmp_path / "outside.txt") if path == "OUTSIDE" else path
    with pytest.raises(ValueError, match=why):
        project_files(root, [path])


def test_submit_refuses_a_bad_include_in_one_line_before_anything_runs(tmp_path):
    (tmp_path / "outside.txt").write_text(TOKEN)
    for path in (str(tmp_path / "outside.txt"), "no/such/file.txt"):
        proc = subprocess.run([sys.executable, "scripts/databricks_submit.py", "--include", path, "-e", "main"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        line = one_line_error(proc)
        assert line.startswith("error: --include: ") and proc.stdout == "", line


def test_submit_refuses_a_committed_symlink_leading_outside_in_one_line(tmp_path, capsys):
    from scripts.databricks_submit import main

    root = _repo(tmp_path)
    (root / "creds").symlink_to(tmp_path / "outside.txt")
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "add", "creds"], check=True)
    subprocess.run([*git, "commit", "-qm", "link"], check=True)
    assert main(["-e", "main"], root=root) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == f"error: creds: a committed symlink that leads outside the repository {root}\n"
