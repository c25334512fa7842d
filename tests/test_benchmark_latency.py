"""growprune.benchmark.latency: the ``latency`` suite command (prune, export, time interleaved)."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from growprune.benchmark.latency import (prune_unstructured, resolve_config, run_latency_entry, summarize,
                                         time_interleaved, torch_threads)

FAST = {"rounds": 2, "round_seconds": 0.01, "warmup": 1, "batch_sizes": [1, 4]}


def _entry(config, target=2.0, seed=0):
    return SimpleNamespace(config=config, target=target, seed=seed)


def test_structured_entry_reports_speedups_and_hits_the_flops_target(tmp_path):
    config = {"model": {"arch": "vgg11_bn", "arch_kwargs": {"width": 0.125}}, "input_shape": [3, 16, 16],
              "pruning": {"round_to": 2}, "timing": FAST}
    threads = torch.get_num_threads()
    record = run_latency_entry(_entry(config), tmp_path)
    assert torch.get_num_threads() == threads and record["threads"] == 1
    assert record["flops_reduction"] == pytest.approx(2.0, abs=0.06)
    assert record["flops_original"] / record["flops_pruned"] == pytest.approx(record["flops_reduction"])
    assert record["params_pruned"] < record["params_original"]
    assert record["folded_batch_norms"] == 8 and record["export_max_abs_diff"] < 1e-4
    assert record["export_format"] == "torchscript"
    # dense and pruned run in the same runtime: "auto" decides on the dense network, the pruned one follows
    assert record["torchscript_optimized"] == record["dense_torchscript_optimized"]
    assert all(int(width) % 2 == 0 for width in record["widths"].split())
    for batch in (1, 4):
        dense, pruned = record[f"latency_dense_b{batch}_ms"], record[f"latency_pruned_b{batch}_ms"]
        assert dense > 0 and pruned > 0
        assert record[f"speedup_b{batch}"] == pytest.approx(dense / pruned)
        assert record[f"ratio_b{batch}"] == pytest.approx(record[f"speedup_b{batch}"] / record["flops_reduction"])
        assert 0 < record[f"latency_pruned_b{batch}_min_ms"] <= pruned
        assert record[f"ratio_min_b{batch}"] == pytest.approx(
            record[f"latency_dense_b{batch}_min_ms"] / record[f"latency_pruned_b{batch}_min_ms"] / record["flops_reduction"])
    saved = json.loads((tmp_path / "latency_samples.json").read_text())
    assert len(saved["passes_ms"]["b4"]["pruned"]) == 2 and saved["config"]["pruning"]["flops_reduction"] == 2.0
    json.dumps(record)  # the runner stores it as JSON


def test_unstructured_entry_times_csr_kernels_at_the_sparsity_of_the_target(tmp_path):
    config = {"model": {"arch": "lenet_300_100"}, "input_shape": [1, 8, 8], "pruning": {"kind": "unstructured"},
              "timing": {**FAST, "clock": "thread"}}
    record = run_latency_entry(_entry(config, target=20.0), tmp_path)
    assert record["sparsity"] == pytest.approx(0.95)
    weights = 64 * 300 + 300 * 100 + 100 * 10  # 8x8 inputs, 10 classes; the 410 biases stay
    assert record["params_original"] == weights + 410
    assert record["params_nonzero"] == pytest.approx(0.05 * weights + 410, abs=2)
    assert record["flops_reduction"] == pytest.approx(20.0, rel=0.1)  # effective FLOPs (weights only are sparse)
    assert record["sparse_layers"] == 3 and record["export_max_abs_diff"] < 1e-5
    assert record["speedup_b1"] > 0 and record["speedup_b4"] > 0 and record["clock"] == "thread"


def test_config_errors_name_the_key_and_the_valid_choices():
    base = {"model": {"arch": "lenet_300_100"}}
    with pytest.raises(ValueError, match=r"unknown key 'timing\.round' \(did you mean 'rounds'\?\); valid keys: batch_sizes"):
        resolve_config({**base, "timing": {"round": 3}}, 2.0)
    with pytest.raises(ValueError, match="unknown key 'pruner'"):
        resolve_config({**base, "pruner": {}}, 2.0)
    with pytest.raises(ValueError, match="pruning.kind 'channels' is not one of structured, unstructured, none"):
        resolve_config({**base, "pruning": {"kind": "channels"}}, 2.0)
    with pytest.raises(ValueError, match="needs pruning.flops_reduction"):
        resolve_config(base, None)
    with pytest.raises(ValueError, match="export.format 'onnx' is not one of torchscript, eager"):
        resolve_config({**base, "export": {"format": "onnx"}}, 2.0)
    with pytest.raises(ValueError, match="timing.clock 'thread' measures one thread's CPU time: it needs timing.threads 1"):
        resolve_config({**base, "timing": {"clock": "thread", "threads": 2}}, 2.0)
    with pytest.raises(ValueError, match="timing.clock 'cpu' is not one of wall, thread"):
        resolve_config({**base, "timing": {"clock": "cpu"}}, 2.0)
    with pytest.raises(ValueError, match="model.arch"):
        resolve_config({}, 2.0)
    assert resolve_config(base, 4.0)["pruning"]["flops_reduction"] == 4.0
    assert resolve_config({**base, "pruning": {"kind": "unstructured"}}, 4.0)["pruning"]["sparsity"] == 0.75


def test_global_magnitude_pruning_zeroes_the_smallest_weights_across_layers():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[2].weight.mul_(100)  # the second layer's weights are all larger: it keeps more
    magnitudes = torch.cat([model[0].weight.abs().flatten(), model[2].weight.abs().flatten()])
    kept = set(magnitudes.topk(60).values.tolist())
    prune_unstructured(model, 0.8)
    remaining = torch.cat([model[0].weight.flatten(), model[2].weight.flatten()])
    assert int((remaining != 0).sum()) == 60 and set(remaining[remaining != 0].abs().tolist()) == kept
    assert int((model[2].weight != 0).sum()) > int((model[0].weight != 0).sum())


def test_interleaved_timing_rotates_the_order_and_gives_one_median_per_round():
    calls = []
    runs = {name: (lambda x, name=name: calls.append(name)) for name in ("a", "b", "c")}
    with pytest.raises(ValueError, match="clock must be one of wall, thread"):
        time_interleaved(runs, {1: torch.zeros(1)}, clock="process")
    samples = time_interleaved(runs, {1: torch.zeros(1)}, rounds=3, round_seconds=1e-9, warmup=0)
    assert {name: [len(times) for times in rounds] for name, rounds in samples[1].items()} == {
        "a": [1, 1, 1], "b": [1, 1, 1], "c": [1, 1, 1]}
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    summary = summarize([[3.0, 1.0, 2.0], [5.0, 4.0], [0.5, 9.0, 9.0]])
    assert summary["median"] == 4.5 and summary["min"] == 0.5  # round medians 2, 4.5, 9


def test_exports_for_timing_compute_what_the_module_computes():
    from growprune.benchmark.latency import export_for_timing

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for export in ({"format": "eager", "fold_bn": False, "optimize": False},
                   {"format": "torchscript", "fold_bn": True, "optimize": "auto", "channels_last": True}):
        run, info = export_for_timing(model, example[:1], export)
        with torch.no_grad():
            assert torch.allclose(run(example), model(example), atol=1e-5)
        assert info["folded_batch_norms"] == (1 if export["fold_bn"] else 0) and info["export_max_abs_diff"] < 1e-5
    assert model[0].weight.is_contiguous() and isinstance(model[1], nn.BatchNorm2d)  # the module is untouched
