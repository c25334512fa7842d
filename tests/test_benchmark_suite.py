"""Suite files: validation with line numbers, grid expansion, placeholders, keys, config checks."""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from pathlib import Path

import pytest

from growprune.benchmark.suite import BASELINES, Entry, list_suites, load_suite, resolve_suite_path

BASELINE_METHODS = """\
  rand: {baseline: random, config: {trainer: {max_epochs: 3}}}
  glob: {baseline: global_magnitude, config: {trainer: {max_epochs: 4}}}
  lay: {baseline: layer_magnitude, config: {trainer: {max_epochs: 5}}}
  small: {baseline: dense_same_size, config: {model: {arch_kwargs: {width: "${width}"}}}}
"""


def write_suite(text: str, name: str = "tiny", folder: Path | None = None) -> Path:
    folder = folder or Path("benchmarks/suites")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def basic_suite(extra_methods: str = "", top: str = "", name: str = "tiny") -> Path:
    return write_suite(
        f"""\
name: {name}
description: A tiny suite. Second sentence.
command: fit
seeds: [0, 1]
targets: [2, 4]
{top}config:
  seed_everything: "${{seed}}"
  trainer: {{max_epochs: 2, callbacks: [a, b]}}
models:
  m1: {{model: {{arch: lenet_300_100}}}}
  m2: {{model: {{arch: lenet5}}}}
datasets:
  digits: {{data: {{class_path: growprune.data.DigitsDataModule}}}}
methods:
  dense: {{targets: null, config: {{trainer: {{callbacks: []}}}}}}
{BASELINE_METHODS}{extra_methods}""",
        name,
    )


def line_of(path: Path, text: str) -> int:
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_grid_order_labels_and_typed_placeholders():
    path = basic_suite('  magn: {targets: [8], config: {amount: "${sparsity}", tag: "t${target}-s${seed}", d: "${density}"}}\n')
    suite = load_suite("tiny", validate_configs=False)
    # model, data, method (file order), target, seed
    expected = []
    for model in ("m1", "m2"):
        expected += [f"dense/{model}/digits/tnone/s{seed}" for seed in (0, 1)]
        for method in ("rand", "glob", "lay", "small"):
            expected += [f"{method}/{model}/digits/t{target}/s{seed}" for target in (2.0, 4.0) for seed in (0, 1)]
        expected += [f"magn/{model}/digits/t8.0/s{seed}" for seed in (0, 1)]
    assert [entry.label for entry in suite.entries] == expected
    magn = next(entry for entry in suite.entries if entry.label == "magn/m2/digits/t8.0/s1")
    assert magn.config["amount"] == pytest.approx(1 - 1 / 8) and isinstance(magn.config["amount"], float)
    assert magn.config["d"] == pytest.approx(0.125)
    assert magn.config["tag"] == "t8.0-s1"
    assert magn.config["seed_everything"] == 1 and isinstance(magn.config["seed_everything"], int)
    assert magn.target == 8.0 and magn.seed == 1 and magn.baseline is None and magn.suite == "tiny"
    small = next(entry for entry in suite.entries if entry.method == "small")
    assert small.config["model"]["arch_kwargs"]["width"] == "${width}"  # resolved by the entry at run time
    assert small.baseline == "dense_same_size"
    assert suite.path == path and suite.description.startswith("A tiny suite")


def test_merge_order_base_config_data_model_method(tmp_path):
    Path("base.yaml").write_text("trainer: {max_epochs: 1, deterministic: true}\nmodel: {arch: base_arch, lr: 1}\nlist: [1, 2, 3]\n")
    write_suite("""\
        name: merge
        command: fit
        base: base.yaml
        require_baselines: false
        seeds: [0]
        config: {trainer: {max_epochs: 2}, list: [9], model: {lr: 2}}
        models: {m: {model: {arch: model_arch}}}
        datasets: {d: {model: {arch: data_arch, lr: 3}, trainer: {max_epochs: 3}}}
        methods: {x: {targets: null, config: {trainer: {max_epochs: 4}}}}
    """, "merge")
    (entry,) = load_suite("merge", validate_configs=False).entries
    assert entry.config == {
        "trainer": {"max_epochs": 4, "deterministic": True},  # method wins, dicts merge
        "model": {"arch": "model_arch", "lr": 3},           # model over data over config over base
        "list": [9],                                         # lists replace
    }


def test_key_is_sha256_of_command_and_config_and_baselines_add_target():
    basic_suite()
    suite = load_suite("tiny", validate_configs=False)
    dense = suite.entries[0]
    canonical = json.dumps({"command": "fit", "config": dense.config}, sort_keys=True, separators=(",", ":"))
    assert dense.key == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    keys = [entry.key for entry in suite.entries]
    assert len(set(keys)) == len(keys)
    # the same-size baseline's config is identical for both targets; its key still differs
    small = [entry for entry in suite.entries if entry.method == "small" and entry.model == "m1" and entry.seed == 0]
    assert small[0].config == small[1].config and small[0].key != small[1].key
    assert Entry.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense
    # the key is stable across loads (a rerun finds the same directories)
    assert [entry.key for entry in load_suite("tiny", validate_configs=False).entries] == keys


def test_unknown_top_level_key_names_file_line_key_and_suggestion():
    path = basic_suite(top="seed: [3]\n")
    with pytest.raises(ValueError) as info:
        load_suite("tiny", validate_configs=False)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line_of(path, 'seed: [3]')}: unknown key 'seed'")
    assert "did you mean 'seeds'?" in message and "valid keys: name, description, command" in message


def test_unknown_method_and_report_keys():
    path = basic_suite("  magn: {targts: [8]}\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:{line_of(path, 'targts')}: unknown key 'targts' in method 'magn' \(did you mean 'targets'\?\); valid keys: config, targets"):
        load_suite("tiny", validate_configs=False)
    path = basic_suite(top="report:\n  title: x\n  plot: []\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:{line_of(path, 'plot: []')}: unknown key 'plot' in the report section \(did you mean 'plots'\?\)"):
        load_suite("tiny", validate_configs=False)


@pytest.mark.parametrize(
    ("replace", "by", "match"),
    [
        ("seeds: [0, 1]", "seeds: [0, 0.5]", r"'seeds' must be a non-empty list of integers"),
        ("seeds: [0, 1]", "seeds: 3", r"'seeds' must be a non-empty list of integers"),
        ("seeds: [0, 1]", "seeds: [1, 1]", r"'seeds' lists a seed twice"),
        ("targets: [2, 4]", "targets: [1, 4]", r"'targets' must be a non-empty list of numbers > 1"),
        ("command: fit", "command: fitt", r"unknown command 'fitt' \(did you mean 'fit'\?\); valid commands: fit, evolve, qd, latency"),
        ("name: tiny", "name: other", r"name 'other' must equal the file name's stem 'tiny'"),
        ("baseline: random", "baseline: randm", r"unknown baseline kind 'randm' \(did you mean 'random'\?\); valid kinds: " + ", ".join(BASELINES)),
        ("  dense: {targets: null", "  dense: {models: [m3], targets: null", r"'methods.dense.models' names unknown model 'm3'.*the suite's models: m1, m2"),
        ("  m2: {model", "  m2: 5\n  m9: {model", r"'models.m2' must be a mapping"),
    ],
)
def test_wrong_values_are_one_line_errors_with_the_line(replace, by, match):
    path = basic_suite()
    text = path.read_text()
    assert replace in text
    path.write_text(text.replace(replace, by, 1))
    with pytest.raises(ValueError) as info:
        load_suite("tiny", validate_configs=False)
    message = str(info.value)
    assert "\n" not in message and re.search(match, message), message
    first = by.splitlines()[0].strip()
    assert message.startswith(f"{path}:{line_of(path, first)}:"), message


def test_missing_required_key_and_invalid_yaml():
    path = basic_suite()
    path.write_text(path.read_text().replace("seeds: [0, 1]\n", ""))
    with pytest.raises(ValueError, match=r"required key 'seeds' is missing"):
        load_suite("tiny", validate_configs=False)
    path.write_text("name: tiny\nseeds: [0\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:\d+: not valid YAML"):
        load_suite("tiny", validate_configs=False)


def test_duplicate_keys_name_both_labels():
    path = basic_suite()
    path.write_text(path.read_text().replace('  seed_everything: "${seed}"\n', "  seed_everything: 0\n"))
    with pytest.raises(ValueError, match=r"entries dense/m1/digits/tnone/s0 and dense/m1/digits/tnone/s1 have the same resolved config"):
        load_suite("tiny", validate_configs=False)


def test_require_baselines_lists_the_missing_kinds():
    path = basic_suite()
    path.write_text(path.read_text().replace("  lay: {baseline: layer_magnitude, ", "  lay: {targets: null, "))
    with pytest.raises(ValueError, match=r"baseline kinds missing: layer_magnitude \(.*require_baselines: false"):
        load_suite("tiny", validate_configs=False)
    path.write_text("require_baselines: false\n" + path.read_text())
    assert not load_suite("tiny", validate_configs=False).require_baselines


def test_target_placeholder_in_untargeted_method_names_the_method():
    basic_suite('  nn: {targets: null, config: {amount: "${sparsity}"}}\n')
    with pytest.raises(ValueError, match=r"method 'nn' has no target \(targets: null\) but its config uses '\$\{sparsity\}'"):
        load_suite("tiny", validate_configs=False)
    basic_suite('  nn: {targets: null, config: {amount: "${sparsty}"}}\n')
    with pytest.raises(ValueError, match=r"unknown placeholder '\$\{sparsty\}'; valid placeholders: \$\{seed\}"):
        load_suite("tiny", validate_configs=False)


def test_method_restrictions_and_alternatives():
    Path("present.txt").write_text("x")
    basic_suite(
        "  only_m2: {targets: [8], models: [m2], config: {x: 1}}\n",
        top="",
    )
    path = Path("benchmarks/suites/tiny.yaml")
    path.write_text(path.read_text().replace(
        "  digits: {data: {class_path: growprune.data.DigitsDataModule}}",
        "  digits:\n    alternatives:\n      - {requires: [absent.txt], config: {data: {which: first}}}\n"
        "      - {requires: [present.txt], config: {data: {which: second}}}\n      - {config: {data: {which: third}}}",
    ))
    suite = load_suite("tiny", validate_configs=False)
    assert {entry.model for entry in suite.entries if entry.method == "only_m2"} == {"m2"}
    assert {entry.config["data"]["which"] for entry in suite.entries} == {"second"}


def test_list_suites_and_unknown_suite_lists_them(tmp_path):
    basic_suite(name="alpha")
    basic_suite(name="beta")
    assert list_suites() == ["alpha", "beta"]
    assert list_suites(tmp_path / "nowhere") == []
    with pytest.raises(ValueError, match=r"^unknown suite 'alpah' \(did you mean 'alpha'\?\); available suites in benchmarks/suites: alpha, beta$"):
        load_suite("alpah")
    assert resolve_suite_path("benchmarks/suites/beta.yaml") == Path("benchmarks/suites/beta.yaml")
    with pytest.raises(ValueError, match=r"suite file not found: other/x.yaml"):
        resolve_suite_path("other/x.yaml")


def test_fit_config_keys_are_checked_by_growprune_fit_parser():
    """Typos inside command configs: found by LightningCLI's parser, reported at the suite's line."""
    path = basic_suite("  magn: {targets: [8], config: {trainer: {max_epoch: 3}}}\n")
    path.write_text(path.read_text().replace("callbacks: [a, b]", "callbacks: []"))
    with pytest.raises(ValueError) as info:
        load_suite("tiny")
    message = str(info.value)
    assert message == (f"{path}:{line_of(path, 'max_epoch: 3')}: fit config of magn/m1/digits/t8.0/s0: "
                       "unknown option 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)")
    # deep inside a callback's init_args, written on its own line
    path = basic_suite(textwrap.dedent("""\
      magn:
        targets: [8]
        config:
          trainer:
            callbacks:
              - class_path: growprune.strategies.UnstructuredPruning
                init_args:
                  schedule: {class_path: growprune.schedules.OneShot, init_args: {amout: 0.5}}
    """).replace("\n", "\n  ").rstrip(" ").replace("magn:", "  magn:", 1))
    path.write_text(path.read_text().replace("callbacks: [a, b]", "callbacks: []"))
    with pytest.raises(ValueError) as info:
        load_suite("tiny")
    message = str(info.value)
    assert message.startswith(f"{path}:{line_of(path, 'amout')}: fit config of magn/m1/digits/t8.0/s0: trainer.callbacks")
    assert "option 'amout' is not accepted (did you mean 'amount'?)" in message
    # a valid config passes (the "${width}" string is fine for arch_kwargs)
    path = basic_suite()
    path.write_text(path.read_text().replace("callbacks: [a, b]", "callbacks: []"))
    assert len(load_suite("tiny").entries) == 36


def test_evolve_config_keys_are_checked_by_evolve_parser():
    path = write_suite("""\
        name: evo
        command: evolve
        seeds: [0]
        config: {seed: "${seed}", generations: 1}
        models: {m: {model: {arch: lenet_300_100}}}
        datasets: {d: {data: {class_path: growprune.data.DigitsDataModule}}}
        methods:
          ga: {targets: null, config: {generatoins: 2}}
    """, "evo")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:8: evolve config of ga/m/d/tnone/s0: .*'generatoins'"):
        load_suite("evo")
    path.write_text(path.read_text().replace("generatoins", "generations"))
    assert [entry.config["generations"] for entry in load_suite("evo").entries] == [2]


def test_a_target_used_only_at_run_time_is_part_of_the_key():
    # latency entries take their default pruning amount from the target, not from the config
    write_suite("""\
        name: lat
        command: latency
        seeds: [0]
        targets: [2, 3]
        config: {input_shape: [1, 28, 28]}
        models: {m: {model: {arch: lenet_300_100}}}
        datasets: {d: {num_classes: 10}}
        methods: {l1: {config: {pruning: {kind: structured}}}}
        """, name="lat")
    entries = load_suite("lat", validate_configs=False).entries
    assert [entry.target for entry in entries] == [2.0, 3.0]
    assert entries[0].config == entries[1].config and entries[0].key != entries[1].key
