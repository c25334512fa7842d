"""The ``growprune qd-analyze`` command: which network descriptors of a QD run's elites go with faster learning.

    growprune qd-analyze runs/qd/lenet300_masks_digits/version_0
    growprune qd-analyze runs/qd/lenet300_masks_digits/version_0 --max_elites 50 --max_steps 100
    growprune qd-analyze runs/qd/lunarlander/version_0 --descriptors modularity,assortativity
    growprune qd-analyze <run_dir> --target_accuracy 0.95        # absolute target instead of start + gain
    growprune qd-analyze <run_dir> --init reinit                 # train each mask from the same fresh weights

For each analysed elite of the run's archive it computes the descriptors and a learning speed,
then Spearman's rho of every descriptor with the speed, a bootstrap CI, a permutation p-value and
Benjamini-Hochberg adjusted p-values (see :mod:`growprune.qd.analysis` for the definitions and the
sign convention: rho > 0 means "higher descriptor, faster learning"). Outputs go to
``<run_dir>/analysis/`` (``analysis_1``, ``analysis_2``, ... when it exists; ``--out`` names another
folder, numbered the same way): ``elites.csv``, ``correlations.csv``, ``correlations.png`` and
``summary.json``. The correlations are printed as a table; the last line is ``summary: <path>``.

Bad input (not a run directory, an unknown descriptor or option, an archive with too few usable
elites) is reported as one line ``growprune: error: ...`` with exit code 2 before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, Optional

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from growprune.cli_errors import error_line, explain_parser_error
from growprune.errors import ConfigurationError


def build_parser() -> ArgumentParser:
    """The ``growprune qd-analyze`` parser (defaults: :class:`growprune.qd.analysis.AnalysisOptions`)."""
    parser = ArgumentParser(
        prog="growprune qd-analyze",
        description="Correlate network descriptors of a QD run's elites with learning speed (see growprune.cli_qd_analyze).",
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument("run_dir", type=str, help="a growprune qd run directory (<root>/<name>/version_<n>)")
    parser.add_argument("--max_elites", type=Optional[int], default=200,
                        help="analyse a seeded sample of this many elites (null: all)")
    parser.add_argument("--descriptors", type=Optional[str], default=None,
                        help="comma-separated descriptor names (default: all; an unknown name lists the valid ones)")
    parser.add_argument("--speed", type=Literal["auto", "retraining", "lineage"], default="auto",
                        help="learning speed: retraining (supervised), lineage (objective gained per generation), "
                             "auto: retraining when the task has training data, else lineage")
    parser.add_argument("--init", type=Literal["trained", "reinit"], default="trained",
                        help="retraining starts from the elite's own weights (trained) or from a fresh seeded "
                             "initialisation, the same for every elite, masked (reinit: the structure's learning speed)")
    parser.add_argument("--target_accuracy", type=Optional[float], default=None,
                        help="absolute validation accuracy to reach (null: trained: each elite's start accuracy + "
                             "target_gain; reinit: the median accuracy of the analysed elites after max_steps)")
    parser.add_argument("--target_gain", type=float, default=0.02,
                        help="accuracy above its start an elite must reach when target_accuracy is null")
    parser.add_argument("--max_steps", type=int, default=200, help="retraining steps; elites not reaching the target "
                                                                    "are censored at max_steps + 1")
    parser.add_argument("--eval_every", type=int, default=10, help="steps between validation measurements")
    parser.add_argument("--learning_rate", type=Optional[float], default=None,
                        help="retraining learning rate (null: 0.05 for sgd, 0.001 for adam)")
    parser.add_argument("--optimizer", type=Literal["sgd", "adam"], default="sgd", help="retraining optimizer")
    parser.add_argument("--batch_size", type=int, default=64, help="retraining minibatch size")
    parser.add_argument("--probe_size", type=int, default=500,
                        help="validation images of the probe batch of the information measures")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95 percent CI (0: none)")
    parser.add_argument("--permutations", type=int, default=1000, help="permutations of the p-value (0: none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the elite sample, batch order, probe, Louvain, bootstrap and permutations")
    parser.add_argument("--control", type=Optional[str], default="density",
                        help="descriptor held fixed in the partial correlations rho|ctl, p|ctl (null: none)")
    parser.add_argument("--out", type=Optional[str], default=None,
                        help="output folder (default <run_dir>/analysis; _1, _2, ... appended while it exists)")
    return parser


def _descriptor_list(text: str | None) -> list[str] | None:
    """``"a,b"``, ``"a b"`` or ``"[a, b]"`` -> ``["a", "b"]``; ``None`` stays ``None`` (all)."""
    if text is None:
        return None
    names = [part for part in text.strip().strip("[]").replace(",", " ").split() if part]
    return [name.strip("'\"") for name in names]


def parse(argv: list[str]) -> Namespace:
    """Parse and check the command line.

    Raises:
        ConfigurationError: one line naming the option and the problem.
    """
    from growprune.qd.analysis import AnalysisOptions

    parser = build_parser()
    try:
        config = parser.parse_args(list(argv))
    except ArgumentError as error:
        raise ConfigurationError(explain_parser_error(str(error), {"qd-analyze": [a.dest for a in parser._actions]})) from error
    options = AnalysisOptions(
        max_elites=config.max_elites, descriptors=_descriptor_list(config.descriptors), speed=config.speed,
        init=config.init,
        target_accuracy=config.target_accuracy, target_gain=config.target_gain, max_steps=config.max_steps,
        eval_every=config.eval_every, learning_rate=config.learning_rate, optimizer=config.optimizer,
        batch_size=config.batch_size, probe_size=config.probe_size, bootstrap=config.bootstrap,
        permutations=config.permutations, seed=config.seed, control=config.control)
    config.archive_descriptors = run_descriptors(Path(config.run_dir))
    try:
        options.check(config.archive_descriptors)
    except ValueError as error:
        raise ConfigurationError(str(error)) from error
    check_run_dir(config.run_dir)
    config.options = options
    return config


def run_descriptors(run_dir: Path) -> list[str]:
    """The run's archive dimensions (``descriptors`` of its ``config.yaml``; none without one)."""
    import yaml

    if not (run_dir / "config.yaml").is_file():
        return []
    try:
        stored = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigurationError(f"run_dir: {run_dir}/config.yaml is not valid YAML: {error}") from error
    return [str(name) for name in stored.get("descriptors") or []]


def check_run_dir(run_dir: str | Path) -> Path:
    """The run directory, if it looks like one of ``growprune qd`` (``config.yaml`` and ``archive.pkl``
    or, for an unfinished run, ``state.pkl``).

    Raises:
        ConfigurationError: it does not exist or holds no qd run.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigurationError(f"run_dir: {run_dir} is not a directory")
    missing = [name for name in ("config.yaml",) if not (path / name).is_file()]
    if not (path / "archive.pkl").is_file() and not (path / "state.pkl").is_file():
        missing.append("archive.pkl")
    if missing:
        raise ConfigurationError(f"run_dir: {run_dir} is not a growprune qd run directory (no {' or '.join(missing)} in it)")
    return path


def analyze_main(argv: list[str]) -> None:
    """``growprune qd-analyze <run_dir> ...``: bad input exits with code 2 and one line on stderr."""
    from growprune.cli_output import quiet_boilerplate

    try:
        with quiet_boilerplate():
            config = parse(list(argv))
            run_dir = Path(config.run_dir)
            from growprune.qd import load_run
            from growprune.qd.analysis import analyze, format_table

            try:
                loaded = load_run(run_dir)
            except ConfigurationError:
                raise
            except (ValueError, FileNotFoundError, KeyError, EOFError) as error:
                raise ConfigurationError(f"run_dir: {run_dir} cannot be loaded: {error}") from error
            try:
                result = analyze(loaded.task, loaded.archive, config.options, run_dir=run_dir,
                                 out_dir=Path(config.out) if config.out else None,
                                 archive_descriptors=config.archive_descriptors)
            except ConfigurationError:
                raise
            except ValueError as error:
                raise ConfigurationError(str(error)) from error
    except ConfigurationError as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
    summary = result.summary
    counts = (f"analysed {summary['elites_analysed']} of {summary['elites_in_archive']} elites; "
              f"learning speed: {result.speed_kind}")
    if result.speed_kind == "lineage":
        counts += f"; {summary['excluded_depth0']} elites of lineage depth 0 excluded"
    else:
        counts += (f"; {summary['censored']} elites never reached the target within "
                   f"{config.options.max_steps} steps (censored at {config.options.max_steps + 1})")
    print(counts)
    print("rho > 0: a higher descriptor goes with faster learning; p_BH: Benjamini-Hochberg adjusted")
    print(format_table(result.correlations), flush=True)
    from growprune.evolution.run import shown_path

    print(f"summary: {shown_path(result.summary_path)}", flush=True)


if __name__ == "__main__":
    analyze_main(sys.argv[1:])
