"""Project files users and tools rely on."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_citation_file_is_valid_cff_1_2_0():
    cffconvert = Path(sys.executable).parent / "cffconvert"  # installed with the test extras
    result = subprocess.run([str(cffconvert), "--validate", "-i", str(REPO / "CITATION.cff")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_readme_names_the_two_setup_commands():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


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
