"""The study's analysis (issue 11) on real ``growprune qd`` runs: Spearman rho of each descriptor with
learning speed, and what the analysis costs.

    python -m benchmarks.qd_analysis --config configs/qd/lenet300_masks_digits.yaml --tag digits
    python -m benchmarks.qd_analysis --run_dir runs/qd/lenet300_masks_digits/version_0 --tag digits_reinit \
        --analyze_args "--init reinit"
    python -m benchmarks.qd_analysis --config configs/qd/lunar_lander_netsci.yaml --tag lunar \
        --qd_args "--iterations 40 --engine_options {workers:1} --chunks 1"

With ``--config`` the run is made first (``growprune qd -c <config> <qd_args> --root <scratch>``,
W&B disabled), with ``--run_dir`` an existing run is analysed. Then ``growprune qd-analyze <run_dir>
<analyze_args>`` runs in-process and one row per (speed measure, descriptor) is APPENDED to
``benchmarks/results/qd_analysis.csv`` (``--out`` for another file) with the run's settings, the
elite counts and the wall times of both commands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from benchmarks import records

SCRATCH = records.REPO / "benchmarks" / "out" / "qd_analysis"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="a growprune qd config: make the run first")
    source.add_argument("--run_dir", help="an existing growprune qd run directory")
    parser.add_argument("--qd_args", default="", help="extra arguments of growprune qd (one string)")
    parser.add_argument("--analyze_args", default="", help="extra arguments of growprune qd-analyze (one string)")
    parser.add_argument("--tag", required=True, help="name of this setting in the CSV")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", default=str(records.results_path("qd_analysis")), help="CSV to append to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from growprune.cli import main as growprune

    appender = records.CsvAppender(Path(args.out))
    info = records.run_info()
    qd_seconds = None
    if args.config:
        root = SCRATCH / info["run"]
        started = time.perf_counter()
        growprune(["qd", "-c", args.config, *shlex.split(args.qd_args), "--root", str(root), "--wandb.mode", "disabled"])
        qd_seconds = time.perf_counter() - started
        run_dir = next(iter(sorted(root.glob("*/version_*"))))
    else:
        run_dir = Path(args.run_dir)
    started = time.perf_counter()
    growprune(["qd-analyze", str(run_dir), *shlex.split(args.analyze_args)])
    analyze_seconds = time.perf_counter() - started
    summary_path = sorted(run_dir.glob("analysis*/summary.json"), key=lambda p: p.stat().st_mtime)[-1]
    summary = json.loads(summary_path.read_text())
    options = summary["options"]
    rows = []
    for row in summary["correlations"]:
        rows.append({
            **info, "tag": args.tag, "config": args.config or "-", "qd_args": args.qd_args or "-",
            "analyze_args": args.analyze_args or "-", "task": summary["task"], "speed_kind": summary["speed_kind"],
            "init": options["init"], "max_steps": options["max_steps"], "seed": options["seed"],
            "bootstrap": options["bootstrap"], "permutations": options["permutations"],
            "elites_in_archive": summary["elites_in_archive"], "elites_analysed": summary["elites_analysed"],
            "excluded_depth0": summary["excluded_depth0"], "censored": summary["censored"],
            "speed": row["speed"], "descriptor": row["descriptor"], "n": row["n"], "rho": row["rho"],
            "ci_low": row["ci_low"], "ci_high": row["ci_high"], "p_permutation": row["p_permutation"],
            "p_adjusted": row["p_adjusted"], "note": row["note"],
            "qd_seconds": f"{qd_seconds:.1f}" if qd_seconds is not None else "-",
            "analyze_seconds": f"{analyze_seconds:.1f}",
        })
    appender.append_many(rows)
    print(f"{len(rows)} rows appended to {appender.path} (run {run_dir}; qd {qd_seconds and round(qd_seconds, 1)} s, "
          f"qd-analyze {analyze_seconds:.1f} s)")


if __name__ == "__main__":
    main()
