"""The README and docs/*.md point at what exists, and the README stays one screen (150 lines).

- every relative link resolves to a file, without an anchor (anchors break silently when a heading
  changes);
- every ``python -m X`` names a module of the project or an installed one;
- every ``mlflow run`` (and ``scripts/databricks_submit.py``, which runs it) names an entry point of
  MLproject and only parameters that entry point declares (for ``main``, ``params_file`` and the
  profile keys its parser overrides); every command to copy names the quick start's experiment
  (on Databricks, the bundle's workspace path), so that no run lands in ``Default``;
- every ``-P name=`` anywhere is a parameter of some entry point, every ``entry_point=`` one of
  MLproject;
- every ``params/``, ``data/`` and other project path named exists.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml

from phi3mlflow import PROJECT_ROOT
from phi3mlflow.chain import PROFILE_KEYS
from steps import main as main_step

README = PROJECT_ROOT / "README.md"
PAGES = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 150
MLPROJECT = yaml.safe_load((PROJECT_ROOT / "MLproject").read_text())["entry_points"]
# The experiment the Databricks job logs to: a workspace path, where the local one is a plain name.
DATABRICKS_EXPERIMENT = yaml.safe_load((PROJECT_ROOT / "databricks.yml").read_text())["variables"]["experiment_name"][
    "default"
]
# main declares only params_file; its overrides are profile keys its parser takes as flags.
MAIN_PARAMS = {"params_file"} | (set(PROFILE_KEYS) & set(main_step.OVERRIDES))
# `mlflow run` options that take a value (mlflow run --help), and the submit script's own.
VALUE_OPTIONS = {"-v", "--version", "-c", "--backend-config", "--env-manager", "--experiment-id", "--storage-dir",
                 "--run-id", "--run-name", "-A", "--docker-args", "--include"}  # fmt: skip
FLAG_OPTIONS = {"--build-image"}
TAKES_VALUE = VALUE_OPTIONS | {"-e", "--entry-point", "-P", "--param-list", "--experiment-name", "-b", "--backend"}
SHELL_BREAKS = {"&&", "||", ";", "|", "&"}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# "python -m steps.<name>" is a pattern, not a module: no match.
PYTHON_M = re.compile(r"\bpython[\d.]*\s+-m\s+([A-Za-z_][\w.]*)(?![\w.<])")
ENTRY_POINT_KWARG = re.compile(r"""\bentry_point\s*=\s*["']([^"']+)["']""")
PARAM_FLAG = re.compile(r"(?:^|\s)(?:-P|--param-list)\s+([A-Za-z_]\w*)=")
# How the docs spell "any parameter": -P name=value.
PLACEHOLDER_PARAMS = {"name"}
# A path under one of the project's folders, as prose or a command names it ("params/*.yaml", a
# glob, and "~/.cache/phi3mlflow", not a project path, do not match).
PROJECT_PATH = re.compile(r"(?<![\w./~-])((?:params|data|phi3mlflow|steps|tests|scripts|deploy|bench|docs)/[\w./-]*\w)")
ROOT_FILE = re.compile(r"(?<![\w./~-])((?:requirements[\w-]*\.txt)|[\w-]+\.ya?ml|MLproject|CHANGELOG\.md)\b")


def _rel(page: Path) -> str:
    return str(page.relative_to(PROJECT_ROOT))


def _blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks: (language, body)."""
    return FENCE.findall(text)


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def _shell_lines(body: str) -> list[str]:
    """A shell block's commands, continuation lines joined."""
    return [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]


def _commands(text: str) -> list[tuple[str, bool]]:
    """Every command line of a page: (command, in a code block). Shell blocks give their lines;
    inline code spans give themselves, whitespace collapsed (a span may wrap)."""
    found = []
    for lang, body in _blocks(text):
        if lang in ("bash", "sh", "shell", "console", ""):
            found += [(line, True) for line in _shell_lines(body)]
    found += [(" ".join(span.split()), False) for span in INLINE_CODE.findall(_prose(text))]
    return found


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command, comments=True)
    except ValueError as e:
        raise AssertionError(f"cannot parse as a shell command ({e}): {command}") from None


def _mlflow_runs(command: str) -> list[tuple[list[str], bool]]:
    """The arguments of every ``mlflow run`` in a command line, and whether it is submitted to
    Databricks by scripts/databricks_submit.py (which runs ``mlflow run`` with them)."""
    if "mlflow run" not in command and "databricks_submit.py" not in command:
        return []
    tokens = _tokens(command)
    found = []
    for i, token in enumerate(tokens):
        submit = token.endswith("scripts/databricks_submit.py")
        if submit or (token == "mlflow" and tokens[i + 1 : i + 2] == ["run"]):
            args = []
            for t in tokens[i + (1 if submit else 2) :]:
                if t in SHELL_BREAKS:
                    break
                args.append(t)
            found.append((args, submit))
    return found


def _parse_run(args: list[str], submit: bool) -> dict:
    """``mlflow run`` arguments as entry point, parameters, experiment and backend."""
    run: dict = {"entry": "main", "params": [], "experiment": None, "backend": "databricks" if submit else None,
                 "uri": "." if submit else None, "problems": []}  # fmt: skip
    pending = list(args)
    while pending:
        arg = pending.pop(0)
        name, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        value = ""
        if name in TAKES_VALUE:
            value = inline if eq else (pending.pop(0) if pending else "")
        if name in ("-e", "--entry-point"):
            run["entry"] = value
        elif name in ("-P", "--param-list"):
            run["params"].append(value)
        elif name == "--experiment-name":
            run["experiment"] = value
        elif name in ("-b", "--backend"):
            run["backend"] = value
        elif name in TAKES_VALUE or name in FLAG_OPTIONS:
            pass
        elif arg.startswith("-"):
            run["problems"].append(f"unknown option {arg}")
        elif run["uri"] is None:
            run["uri"] = arg
        else:
            run["problems"].append(f"unexpected argument {arg!r}")
    return run


def _params_of(entry: str) -> set[str]:
    if entry == "main":
        return MAIN_PARAMS
    return set(MLPROJECT.get(entry, {}).get("parameters") or {})


def _quick_start_experiment() -> str | None:
    """The experiment of the README's first ``mlflow run`` in a code block: the quick start's."""
    for command, in_block in _commands(README.read_text()):
        if in_block:
            for args, submit in _mlflow_runs(command):
                return _parse_run(args, submit)["experiment"]
    return None


EXPERIMENT = _quick_start_experiment()


def _module_exists(name: str) -> bool:
    """``python -m name`` would run: a module of the project, or an installed one (a package only
    with a ``__main__``)."""
    path = PROJECT_ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file() or (path / "__main__.py").is_file():
        return True
    if (PROJECT_ROOT / name.split(".")[0]).exists():
        return False  # the project's own folder decides: no import of what is not there
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations)
    return True


def test_the_readme_is_one_screen():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; at most {MAX_README_LINES}"


def test_the_quick_start_names_an_experiment():
    assert EXPERIMENT, "the README's first `mlflow run` must name --experiment-name"


def test_the_readme_links_every_page_of_the_docs():
    linked = {(README.parent / t).resolve() for t in LINK.findall(_prose(README.read_text()))}
    missing = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve_to_files_without_anchors(page):
    bad = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        if "#" in target:
            bad.append(f"{target}: an anchor (link the file; headings change)")
        elif not (page.parent / target).is_file():
            bad.append(f"{target}: no such file")
    assert not bad, f"{_rel(page)}: " + "; ".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_python_m_names_a_module(page):
    text = page.read_text()
    missing = sorted({m.rstrip(".") for m in PYTHON_M.findall(text) if not _module_exists(m.rstrip("."))})
    assert not missing, f"{_rel(page)}: `python -m` of modules that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_mlflow_run_names_an_entry_point_its_parameters_and_the_experiment(page):
    bad = []
    for command, in_block in _commands(page.read_text()):
        for args, submit in _mlflow_runs(command):
            run = _parse_run(args, submit)
            bad += [f"{p}: {command}" for p in run["problems"]]
            if run["entry"] not in MLPROJECT:
                bad.append(f"no entry point {run['entry']!r}: {command}")
                continue
            for param in run["params"]:
                name, eq, _ = param.partition("=")
                if not eq:
                    bad.append(f"-P {param!r} is not name=value: {command}")
                elif name not in _params_of(run["entry"]):
                    bad.append(f"{run['entry']} takes no parameter {name!r}: {command}")
            # A command to copy names the quick start's experiment, so that no run lands in Default;
            # a bare mention in prose (`mlflow run -b databricks`) is no command.
            if in_block or run["params"] or run["entry"] != "main":
                want = DATABRICKS_EXPERIMENT if run["backend"] == "databricks" else EXPERIMENT
                if run["experiment"] != want:
                    bad.append(f"names experiment {run['experiment']!r}, not {want!r}: {command}")
    assert not bad, f"{_rel(page)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_parameter_named_anywhere_is_one_an_entry_point_takes(page):
    known = MAIN_PARAMS | {p for entry in MLPROJECT for p in _params_of(entry)}
    names = {n for command, _ in _commands(page.read_text()) for n in PARAM_FLAG.findall(command)}
    unknown = sorted(names - known - PLACEHOLDER_PARAMS)
    assert not unknown, f"{_rel(page)}: -P of parameters no entry point takes: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_entry_point_keyword_is_one_of_mlproject(page):
    unknown = sorted(set(ENTRY_POINT_KWARG.findall(page.read_text())) - set(MLPROJECT))
    assert not unknown, f"{_rel(page)}: entry_point= of no MLproject entry point: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_project_path_named_exists(page):
    text = page.read_text()
    named = set(PROJECT_PATH.findall(text)) | set(ROOT_FILE.findall(text))
    missing = sorted(p for p in named if not (PROJECT_ROOT / p).exists())
    assert not missing, f"{_rel(page)}: paths that do not exist: {missing}"


def test_the_parsers_see_what_the_docs_hold_and_catch_what_they_are_for():
    """The checks above find what they check (a command per entry point, params and data paths),
    and would fail on what they guard against."""
    everything = "\n".join(p.read_text() for p in PAGES)
    entries = {
        _parse_run(args, submit)["entry"]
        for command, _ in _commands(everything)
        for args, submit in _mlflow_runs(command)
    }
    assert {"main", "evaluate", "register", "serve", "onnx_wrapper"} <= entries, entries
    assert {"params/smollm2.yaml", "data/real_questions.jsonl"} <= set(PROJECT_PATH.findall(everything))
    assert {"phi3mlflow.serve", "pytest"} <= set(PYTHON_M.findall(everything))
    run = _parse_run(["-e", "serve", "-P", "port=1", "--experiment-name=x", "--bogus"], False)
    assert (run["entry"], run["params"], run["experiment"], run["problems"]) == ("serve", ["port=1"], "x",
                                                                                ["unknown option --bogus"])  # fmt: skip
    bad = "`python -m phi3mlflow.nope`, [a](docs/chain.md#x), params/nope.yaml"
    assert not _module_exists(PYTHON_M.findall(bad)[0])
    assert LINK.findall(bad) == ["docs/chain.md#x"]
    assert PROJECT_PATH.findall(bad)[-1] == "params/nope.yaml" and not (PROJECT_ROOT / "params/nope.yaml").exists()
    assert "dataset" not in _params_of("main")  # a profile key main does not override: set it in a profile
    assert [args for args, _ in _mlflow_runs("mlflow run . -e evaluate && mlflow ui")] == [[".", "-e", "evaluate"]]
