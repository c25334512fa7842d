"""CPU latency of exported networks after a 2x-FLOPs structured prune: does export close the gap
between the FLOPs cut and the latency cut (issue 12's goal: speed-up / FLOPs reduction >= 0.9 at
batch 64 and >= 0.8 at batch 1)?

    python -m benchmarks.latency_export                              # the six families below
    python -m benchmarks.latency_export vgg16_bn resnet56 --rounds 5 # chosen ones
    python -m benchmarks.latency_export --sparse                     # dense vs torch.sparse CSR kernels

(run from the repository root.) Each model runs in its own process with ONE torch thread (the
machine is shared: more threads than idle cores measure the scheduler). Per model: the dense
network and three pruned variants, each ``StructuredPruning(OneShot(0.5), target="flops")``'s plan
(``growprune.benchmark.latency.prune_structured``, the same path as ``benchmarks/structured_latency.py``):

* ``global L1``: global ranking of normalised L1 filter norms;
* ``global L1, round_to=8``: channel counts kept at multiples of 8;
* ``latency cost, max 60 %, round_to=8``: scores divided by each channel's share of the measured
  batch-1 layer time, no group losing more than 60 % of its channels, multiples of 8.

and runtimes for every network: ``eager`` (the plain module, batch norms as they are) and
``ts`` (batch norms folded, frozen TorchScript, ``optimize_for_inference`` when it is faster and
reloads: ``growprune.export``); with ``--runtimes`` also ``ts_cl`` (``ts`` with channels-last weights). All callables of one model are timed in interleaved rounds with a
rotating order at batch 1 and 64 (``growprune.benchmark.latency.time_interleaved``); the figure is
the median of the round medians, and the table also gives the ratio from each callable's fastest
pass (load only adds time). Speed-up = dense / pruned latency in the SAME runtime; ratio =
speed-up / FLOPs reduction. Random weights (seed 0): latency does not depend on the values, the
widths a global ranking picks do.

Models: VGG-16-BN and ResNet-56 (shortcut B) of the registry at 3x32x32; torchvision MobileNetV2,
EfficientNet-B0, ConvNeXt-T and ViT-B/16 at 3x64x64 (as in RESULTS.md "Issue 8"), 10 classes.

Every round's median and fastest pass are appended to ``benchmarks/results/latency_export.csv`` (``--out`` for another
file) with the variant, runtime, batch, FLOPs, parameters, widths, the run's settings and the commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

MODELS = {
    "vgg16_bn": ("vgg16_bn", {}, [3, 32, 32]),
    "resnet56": ("resnet56", {"shortcut": "B"}, [3, 32, 32]),
    "mobilenet_v2": ("torchvision.mobilenet_v2", {}, [3, 64, 64]),
    "efficientnet_b0": ("torchvision.efficientnet_b0", {}, [3, 64, 64]),
    "convnext_tiny": ("torchvision.convnext_tiny", {}, [3, 64, 64]),
    "vit_b_16": ("torchvision.vit_b_16", {}, [3, 64, 64]),
}
VARIANTS = {
    "global L1": {},
    "global L1, round_to=8": {"round_to": 8},
    "latency cost, max 60 %, round_to=8": {"round_to": 8, "cost": "latency", "max_fraction": 0.6},
}
EXPORTS = {"eager": {"format": "eager", "fold_bn": False, "optimize": False},
           "ts": {"format": "torchscript", "fold_bn": True, "optimize": "auto"},
           "ts_cl": {"format": "torchscript", "fold_bn": True, "optimize": "auto", "channels_last": True}}
DEFAULT_RUNTIMES = ["eager", "ts"]


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """Rows (one per model x variant x runtime x batch x round) for model ``name``; prints the table lines."""
    import torch

    from benchmarks import records
    from growprune.benchmark.latency import (build_module, export_for_timing, prune_structured, resolve_config,
                                             summarize, time_interleaved, torch_threads)
    from growprune.metrics import count_parameters, dense_flops

    warnings.simplefilter("ignore")
    arch, arch_kwargs, shape = MODELS[name]
    base = {"model": {"arch": arch, "arch_kwargs": arch_kwargs}, "input_shape": shape}
    example = torch.zeros(1, *shape)
    with torch_threads(args.threads):
        env = records.run_info()
        networks, info = {}, {}
        dense = build_module(resolve_config(base, 2.0), seed=0).model.eval()
        networks["dense"] = dense
        info["dense"] = {"flops": dense_flops(dense, shape), "params": count_parameters(dense), "widths": "-",
                         "not8": "-"}
        for variant, options in VARIANTS.items():
            config = resolve_config({**base, "pruning": {"kind": "structured", **options}}, 2.0)
            module = build_module(config, seed=0)
            try:
                pruned = prune_structured(module, config["pruning"])
            except ValueError as error:
                print(f"| {name} | {variant} | refused: {str(error)[:150]} |", flush=True)
                continue
            networks[variant] = module.model.eval()
            info[variant] = {"flops": dense_flops(module.model, shape), "params": count_parameters(module.model),
                             "widths": " ".join(map(str, pruned["widths"])),
                             "not8": f"{pruned['widths_not_multiple_of_8']}/{len(pruned['widths'])}"}
        runs, export_info = {}, {}
        for variant, network in networks.items():
            for runtime in args.runtimes:
                export = EXPORTS[runtime]
                runs[(variant, runtime)], export_info[(variant, runtime)] = export_for_timing(network, example, export)
        keys = list(runs)
        inputs = {batch: torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1)) for batch in args.batches}
        samples = time_interleaved({f"{v}|{r}": runs[(v, r)] for v, r in keys}, inputs, rounds=args.rounds,
                                   round_seconds=args.round_seconds, warmup=args.warmup, clock=args.clock)
    rows = []
    for variant, runtime in keys:
        reduction = info["dense"]["flops"] / info[variant]["flops"]
        cells = [name, variant, runtime, f"{info[variant]['flops'] / 1e9:.3f}", f"{reduction:.2f}x", info[variant]["not8"]]
        for batch in (1, 64):
            if batch not in samples:
                cells += ["-", "-", "-", "-"]
                continue
            pruned_t = summarize(samples[batch][f"{variant}|{runtime}"])
            dense_t = summarize(samples[batch][f"dense|{runtime}"])
            speedup = dense_t["median"] / pruned_t["median"]
            cells += [f"{pruned_t['median'] * 1e3:.2f} ±{pruned_t['spread_pct']:.0f}%", f"{speedup:.2f}x",
                      f"{speedup / reduction:.2f}", f"{dense_t['min'] / pruned_t['min'] / reduction:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)
        for batch, per_run in samples.items():
            for index, times in enumerate(per_run[f"{variant}|{runtime}"]):
                rows.append({"model": name, "arch": arch, "input": "x".join(map(str, shape)), "variant": variant,
                             "variant_options": records.format_params(VARIANTS.get(variant, {})), "runtime": runtime,
                             "batch": batch, "round": index, "passes": len(times),
                             "round_median_ms": round(statistics.median(times) * 1e3, 5),
                             "round_min_ms": round(min(times) * 1e3, 5),
                             "flops": info[variant]["flops"], "flops_reduction": round(reduction, 4),
                             "params": info[variant]["params"], "widths": info[variant]["widths"],
                             "folded_bn": export_info[(variant, runtime)]["folded_batch_norms"],
                             "ts_optimized": export_info[(variant, runtime)].get("torchscript", {}).get("optimized", "-"),
                             "export_max_abs_diff": f"{export_info[(variant, runtime)]['export_max_abs_diff']:.2e}",
                             "weights": "random, seed 0", "clock": args.clock, "rounds": args.rounds, "round_seconds": args.round_seconds,
                             "warmup": args.warmup, **env})
    return rows


SPARSE_MODELS = {"lenet_300_100": ("lenet_300_100", {}, [1, 28, 28]), "vgg16_bn": MODELS["vgg16_bn"],
                 "resnet56": MODELS["resnet56"]}
SPARSITIES = (0.95, 0.99)


def measure_sparse(args: argparse.Namespace, out: Path) -> None:
    """Dense vs torch.sparse CSR kernels (eager, batch norms folded) after global magnitude pruning."""
    from benchmarks import records
    from growprune.benchmark.latency import measure_pruned_latency

    warnings.simplefilter("ignore")
    print("| model | sparsity | effective FLOPs red. | sparse layers | b1 dense ms | b1 CSR ms | b1 speed-up "
          "| b64 dense ms | b64 CSR ms | b64 speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for name, (arch, arch_kwargs, shape) in SPARSE_MODELS.items():
        for sparsity in SPARSITIES:
            config = {"model": {"arch": arch, "arch_kwargs": arch_kwargs}, "input_shape": shape,
                      "pruning": {"kind": "unstructured", "sparsity": sparsity},
                      "timing": {"batch_sizes": args.batches, "rounds": args.rounds, "round_seconds": args.round_seconds,
                                 "warmup": args.warmup, "threads": args.threads, "clock": args.clock}}
            record, _ = measure_pruned_latency(config, seed=0)
            cells = [name, f"{sparsity:.0%}", f"{record['flops_reduction']:.1f}x", str(record["sparse_layers"])]
            for batch in (1, 64):
                if f"speedup_b{batch}" not in record:
                    cells += ["-", "-", "-"]
                    continue
                cells += [f"{record[f'latency_dense_b{batch}_ms']:.2f}", f"{record[f'latency_pruned_b{batch}_ms']:.2f}",
                          f"{record[f'speedup_b{batch}']:.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)
            rows.append({"model": name, "input": "x".join(map(str, shape)), "clock": args.clock, "rounds": args.rounds,
                         "round_seconds": args.round_seconds,
                         **{key: value for key, value in record.items() if key not in ("arch", "input_shape", "clock")},
                         **records.run_info()})
    records.CsvAppender(out).append_many(rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"models to measure among {', '.join(MODELS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=0.25, help="timed passes per callable and round (>= 1 pass)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--runtimes", nargs="+", choices=list(EXPORTS), default=DEFAULT_RUNTIMES,
                        help="eager: the plain module; ts: batch norms folded, frozen TorchScript; ts_cl: the same "
                             "with channels-last weights (default: eager ts)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="wall: time.perf_counter; thread: CPU time of the (single) torch thread, which leaves "
                             "out time the OS gives other jobs on a shared machine")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV the round medians are appended to (default: benchmarks/results/latency_export.csv)")
    parser.add_argument("--sparse", action="store_true",
                        help="instead: dense vs torch.sparse CSR kernels at 95 %% and 99 %% unstructured sparsity "
                             "(LeNet-300-100, VGG-16-BN, ResNet-56; default CSV benchmarks/results/latency_export_sparse.csv)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    from benchmarks import records

    if args.sparse:
        measure_sparse(args, args.out or records.results_path("latency_export_sparse"))
        return
    out = args.out or records.results_path("latency_export")
    if args.one:
        rows = measure(args.models[0], args)
        records.CsvAppender(out).append_many(rows)
        return
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: it needs --threads 1")
    print(f"{len(args.models)} models, {args.threads} torch thread(s), clock {args.clock}, {args.rounds} interleaved rounds, "
          f"{args.round_seconds} s per callable and round, batches {args.batches}; load average {os.getloadavg()[0]:.2f}")
    print("ms: median of the round medians ±half their interquartile range; ratio = speed-up / FLOPs reduction "
          "(medians); min ratio: from the fastest pass of each callable")
    print("| model | variant | runtime | GFLOPs | FLOPs red. | groups not /8 | b1 ms | b1 speed-up | b1 ratio | b1 min ratio "
          "| b64 ms | b64 speed-up | b64 ratio | b64 min ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    passed = [f"--threads={args.threads}", f"--rounds={args.rounds}", f"--round-seconds={args.round_seconds}",
              f"--warmup={args.warmup}", f"--clock={args.clock}", f"--out={out}", "--batches", *map(str, args.batches),
              "--runtimes", *args.runtimes]
    for name in args.models:
        result = subprocess.run([sys.executable, "-m", "benchmarks.latency_export", "--one", *passed, "--", name],
                                capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("|")]
        print("\n".join(lines) if lines else f"| {name} | failed: {result.stderr.strip().splitlines()[-1:]} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end; rows in {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
