"""The benchmarks' records: settings in every row, append-only CSVs, a summariser that refuses to mix settings."""

import csv
import re

import pytest

from benchmarks import compression_lenet, records, structured_accuracy

ENV = {"threads": 1, "torch": "2.14.1+cu130", "lightning": "2.6.6", "torch_pruning": "1.6.1", "python": "3.11.7"}
INFO = {"commit": "abc1234", "run": "r1", "date": "2025-01-01 00:00Z", "machine": "x86_64", "cpus": 2, "load_start": "0.1"}


def lenet_row(method="dense", target=0.0, seed=0, epochs=40, val_acc=0.97, commit="abc1234", **changes):
    row = {**compression_lenet.settings(method, target, seed, epochs, ENV),
           "val_acc": val_acc, "weights_left": 1.0, "compression": 1.0, "weight_compression": 1.0,
           "effective_flops": 100.0, "dense_flops": 100.0, "seconds": 10.0, **INFO, "commit": commit}
    row.update(changes)
    return row


def write_csv(path, rows):
    records.CsvAppender(path).append_many(rows)
    return path


def test_summariser_refuses_rows_of_different_epochs_naming_the_column(tmp_path, capsys):
    a = write_csv(tmp_path / "a.csv", [lenet_row(seed=0, epochs=40)])
    b = write_csv(tmp_path / "b.csv", [lenet_row(seed=1, epochs=20)])
    with pytest.raises(records.SettingsMismatch) as error:
        compression_lenet.summarise(records.read_rows([a, b]))
    message = str(error.value)
    assert "epochs" in message and "'40'" in message and "'20'" in message and "a.csv" in message and "b.csv" in message
    assert "seed" not in message.split("differing columns:")[1]  # seeds may differ, epochs may not
    # the command line stops with the same message and no table
    with pytest.raises(SystemExit) as exit_info:
        compression_lenet.main(["--summarise", str(a), str(b)])
    assert "epochs" in str(exit_info.value.code)
    assert "| method |" not in capsys.readouterr().out


def test_summariser_puts_one_setting_into_one_table_with_epochs_seeds_and_commits(tmp_path):
    rows = [lenet_row(seed=s, val_acc=0.97 + s / 100) for s in (0, 1, 2)]
    rows += [lenet_row("magnitude-global", 0.9, s, val_acc=0.96, commit=c) for s, c in ((0, "abc1234"), (1, "def5678-dirty"))]
    path = write_csv(tmp_path / "one.csv", rows)
    table = compression_lenet.summarise(records.read_rows([path]))
    assert table[0].startswith("settings: model lenet_300_100") and "threads 1" in table[0]
    header = [cell.strip() for cell in table[2].strip("|").split("|")]
    assert header[-3:] == ["epochs", "seeds", "commit(s)"]
    body = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
            for line in table[4:]}
    dense, pruned = body[("dense", "-")], body[("magnitude-global", "0.90")]
    assert dense[-3:] == ["40", "3 (0,1,2)", "abc1234"]
    assert dense[header.index("final val acc % (mean ± sd)")] == "98.00 ± 1.00"
    assert pruned[-3:] == ["40", "2 (0,1)", "abc1234, def5678-dirty"]
    assert pruned[header.index("vs dense (points)")] == "-2.00"


def test_summariser_refuses_one_method_with_two_parameter_sets_and_repeated_runs(tmp_path):
    first = lenet_row("magnitude-global", 0.9, 0)
    other_schedule = lenet_row("magnitude-global", 0.9, 1, method_params="criterion=magnitude; end=10")
    with pytest.raises(records.SettingsMismatch, match="method_params for method=magnitude-global, target=0.9"):
        compression_lenet.summarise([first, other_schedule])
    # the same run twice (e.g. appended again at a later commit) is refused, or with latest only the last row counts
    again = lenet_row("magnitude-global", 0.9, 0, val_acc=0.5, commit="fff0000")
    with pytest.raises(records.SettingsMismatch, match="--latest"):
        compression_lenet.summarise([first, again])
    table = compression_lenet.summarise([first, again], latest=True)
    assert "| 50.00 ± 0.00 |" in table[-1] and table[-1].endswith("| fff0000 |")


def test_summariser_refuses_csvs_written_before_settings_were_recorded(tmp_path):
    old = {"method": "dense", "target": "0.0", "seed": "0", "val_acc": "0.97", "weights_left": "1", "compression": "1",
           "effective_flops": "1", "dense_flops": "1"}
    with pytest.raises(records.SettingsMismatch, match="lack the setting column"):
        compression_lenet.summarise([old])


def test_structured_accuracy_settings_are_checked_per_model():
    def row(arch, seed, epochs):
        return {**structured_accuracy.settings(arch, "dense", seed, epochs, ENV), "val_acc": 0.99,
                "flops_reduction": 1.0, "params_reduction": 1.0, "seconds": 1.0, **INFO}

    # models trained for different lengths may share the table (it has an epochs column) ...
    table = structured_accuracy.summarise([row("vgg11_bn", 0, 12), row("resnet20", 0, 20), row("resnet20", 1, 20)])
    assert [line.split("|")[7].strip() for line in table[4:]] == ["12", "20"]
    # ... but not the runs of one model
    with pytest.raises(records.SettingsMismatch, match="epochs for arch=vgg11_bn"):
        structured_accuracy.summarise([row("vgg11_bn", 0, 12), row("vgg11_bn", 1, 20)])


def test_a_run_of_other_settings_is_refused_before_training(tmp_path):
    path = write_csv(tmp_path / "results.csv", [lenet_row(seed=0, epochs=40)])
    before = path.read_text()
    with pytest.raises(SystemExit) as exit_info:
        compression_lenet.main(["--methods", "dense", "--seeds", "1", "--epochs", "1", "--out", str(path)])
    assert "epochs" in str(exit_info.value.code) and "--out" in str(exit_info.value.code)
    assert path.read_text() == before


def test_csv_rows_are_appended_never_overwritten_and_other_columns_refused(tmp_path):
    path = tmp_path / "timing.csv"
    samples = {("lenet5", "dense"): [0.001, 0.002]}
    for _ in range(2):
        line = records.save_rows(path, records.sample_rows(samples, ("model", "variant"), "ms", {"epochs": 3}, INFO))
        assert line.startswith("2 raw rows (run r1) appended to")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["repeat"], r["ms"], r["epochs"], r["commit"]) for r in rows] == \
        [("dense", "0", "1.0", "3", "abc1234"), ("dense", "1", "2.0", "3", "abc1234")] * 2
    with pytest.raises(records.SettingsMismatch, match="other columns"):
        records.CsvAppender(path).append({"model": "lenet5", "ms": 1.0})
    # a timing run that ends with other columns keeps its rows beside the file, not in it
    line = records.save_rows(path, [{"model": "lenet5", "ms": 1.0, "run": "r2"}])
    assert "timing.r2.csv (NOT the default file" in line
    assert len(path.read_text().splitlines()) == 5
    assert (tmp_path / "timing.r2.csv").read_text().splitlines() == ["model,ms,run", "lenet5,1.0,r2"]


def test_git_commit_is_short_hash_with_dirty_flag(tmp_path):
    if (records.REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", records.git_commit())
    assert records.git_commit(tmp_path) == "unknown"  # not a checkout: said so, not guessed
