"""Project files users and tools rely on."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_citation_file_is_valid_cff_1_2_0():
    cffconvert = Path(sys.executable).parent / "cffconvert"  # installed with the test extras
    result = subprocess.run([str(cffconvert), "--validate", "-i", str(REPO / "CITATION.cff")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def makefile_recipes(text: str) -> dict[str, list[str]]:
    """Target -> its recipe lines (tab-indented, stripped), for the plain ``name: deps`` rules of a Makefile."""
    recipes: dict[str, list[str]] = {}
    target = None
    for line in text.splitlines():
        if line.startswith("\t"):
            if target is not None:
                recipes[target].append(line.strip())
            continue
        match = re.match(r"^([A-Za-z][\w.-]*)\s*:(?!=)", line)
        if match:
            target = match.group(1)
            recipes[target] = []
        elif line.strip() and not line.startswith("#"):
            target = None
    return recipes


def commands(recipe: list[str]) -> list[str]:
    """A recipe's commands without leading ``VAR=value`` assignments and the ``$(BIN)/`` prefix."""
    result = []
    for line in recipe:
        line = re.sub(r"\s+#.*$", "", line)
        line = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line)
        result.append(line.replace("$(BIN)/", ""))
    return result


def test_readme_setup_commands_are_what_make_and_ci_run():
    readme = (REPO / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"^make demo\b", quickstart, re.M) and re.search(r"^make test\b", quickstart, re.M)
    recipes = makefile_recipes((REPO / "Makefile").read_text())
    # `make demo` runs the quickstart fit the README shows under "The command line"
    assert "growprune fit -c configs/quickstart.yaml" in readme
    assert commands(recipes["demo"]) == ["growprune fit -c configs/quickstart.yaml"]
    # `make test` runs pytest with the project's settings (pyproject: slow tests excluded), W&B off
    assert commands(recipes["test"]) == ["python -m pytest -q"]
    assert "WANDB_MODE=$(WANDB_MODE)" in recipes["test"][0]
    assert re.search(r"^WANDB_MODE \?= disabled$", (REPO / "Makefile").read_text(), re.M)
    assert recipes["test-slow"] and "-m slow" in recipes["test-slow"][0]
    # both first build the environment (the stamp target installs the pinned versions)
    rules = dict(re.findall(r"^(demo|test):\s*(.*)$", (REPO / "Makefile").read_text(), re.M))
    assert rules == {"demo": "$(STAMP)", "test": "$(STAMP)"}
    # CI runs exactly the README's test command
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.strip().startswith("#")]
    start = ci.index("make test")
    assert ci[start:start + 3] == ["make test", "make test-torchvision", "make bench-smoke"] and "set -euo pipefail" in ci
    # ... and the smoke benchmark suite the README promises a newcomer, its leaderboard checked
    assert "growprune benchmark --suite smoke --workers 2" in recipes["bench-smoke"][0]
    assert any("runs/benchmark/smoke/leaderboard.md" in line for line in ci[start + 3:])
    # ... with W&B offline, so the W&B logging runs in CI too
    assert "export WANDB_MODE=offline" in ci


def readme_python_blocks() -> list:
    """Every ```python block of the README as a pytest param; one preceded by ``<!-- not-run: why -->`` is skipped."""
    text = (REPO / "README.md").read_text()
    params = []
    for match in re.finditer(r"(?:<!--\s*not-run:?[ \t]*([^\n]*?)\s*-->[ \t]*\n)?```python\n(.*?)```", text, re.S):
        line = text[: match.start(2)].count("\n") + 1
        reason, code = match.group(1), match.group(2)
        skipped = match.group(0).startswith("<!--")
        marks = [pytest.mark.skip(reason=f"README.md:{line} is marked not-run: {reason or 'no reason given'}")] if skipped else []
        params.append(pytest.param(code, id=f"README.md:{line}", marks=marks))
    return params


@pytest.mark.parametrize("code", readme_python_blocks())
def test_readme_python_blocks_run(code, tmp_path, monkeypatch):
    """Each Python example of the README runs as written (in a fresh namespace, in a temporary
    directory), except that Trainer runs are shortened to 1 epoch; a line ending in a comment that
    shows a dict (``expr   # {'key': ..., ...}``) must evaluate to a dict with exactly those keys."""
    from growprune.models import list_models, unregister_model

    monkeypatch.syspath_prepend(str(tmp_path))
    shortened = re.sub(r"max_epochs=\d+", "max_epochs=1", code)
    registered = set(list_models())
    namespace = {"__name__": "readme_example"}
    try:
        exec(compile(shortened, "README.md", "exec"), namespace)
        for expression, shown in re.findall(r"^(\S.*?)\s+#\s*(\{'.*\})\s*$", shortened, re.M):
            value = eval(expression, namespace)
            assert isinstance(value, dict) and set(value) == set(re.findall(r"'([^']+)'", shown)), expression
    finally:
        for name in set(list_models()) - registered:  # the registry example registers "my_mlp"
            unregister_model(name)


def test_readme_has_the_examples_this_test_runs():
    ids = [param.id for param in readme_python_blocks()]
    texts = [param.values[0] for param in readme_python_blocks()]
    assert len(ids) >= 3
    assert any("register_model" in code for code in texts) and any("size_metrics()" in code for code in texts)


def test_every_config_parses(capsys, monkeypatch):
    """Each shipped YAML config is accepted by the CLI parser (no unknown keys, classes import)."""
    import pytest

    from growprune.cli import main

    monkeypatch.chdir(REPO)  # configs name data paths relative to the repository root
    shared_data = (REPO.parent / "shared" / "data" / "mnist-t10k").is_dir()
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for config in configs:
        if "mnist" in config.name and not shared_data:
            continue  # the MNIST idx files live beside the repository, in ../shared/data

        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "-c", str(config), "--print_config"])
        assert exit_info.value.code == 0, config.name
    capsys.readouterr()


def test_argument_checks_name_the_argument_and_refuse_bools():
    import pytest

    from growprune.validation import check_integer, check_number

    assert check_integer("epochs", 3, minimum=1) == 3
    assert check_number("alpha", 1, minimum=0.0, maximum=1.0, strict_minimum=True) == 1.0
    for call, message in [
        (lambda: check_integer("epochs", True, minimum=1), "epochs must be an integer >= 1, got True"),
        (lambda: check_integer("epochs", 2.0), "epochs must be an integer, got 2.0"),
        (lambda: check_number("alpha", 0.0, minimum=0.0, maximum=1.0, strict_minimum=True), r"alpha must lie in \(0, 1\], got 0.0"),
        (lambda: check_number("rate", float("nan")), "rate must be a finite number, got nan"),
        (lambda: check_number("t", 1.0, minimum=1.0, strict_minimum=True), "t must be > 1, got 1.0"),
        (lambda: check_number("lambda_", -1, minimum=0.0), "lambda_ must be >= 0, got -1"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()
