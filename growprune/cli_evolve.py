"""The ``growprune evolve`` command: an evolutionary search over pruned versions of a trained network.

    growprune evolve -c configs/evolve/lenet300_ga_digits.yaml
    growprune evolve -c configs/evolve/lenet300_ga_digits.yaml --search.init_args.population 8 --engine ray
    growprune evolve -c configs/evolve/lenet300_ga_digits.yaml --resume              # the latest run of that name
    growprune evolve --resume runs/evolve/lenet300_ga_digits/version_0                # that run, its own config
    growprune evolve -c configs/evolve/lenet300_ga_digits.yaml --print_config        # every option with its value

The config is parsed like ``growprune fit``'s (jsonargparse, LightningCLI style): layered ``-c``
files (later wins), dotted overrides, no abbreviated options, and bad input reported as one line
``growprune: error: <where>: <problem>`` with exit code 2 before any run directory or W&B run
exists. Sections (see :func:`build_parser`): ``name``, ``seed``, ``generations``, ``root``,
``model`` (:class:`~growprune.module.GrowPruneModule`; ``num_classes`` and ``input_shape`` come
from the data module), ``data``, ``base`` (pretrain for ``epochs`` or load a ``growprune fit``
checkpoint), ``genotype``, ``objective``, ``search``, ``evaluation``
(:class:`~growprune.evolution.evaluator.PopulationEvaluator`), ``retraining``, ``pbt``, ``engine``,
``engine_options``, ``chunks`` and ``wandb``. The run itself is :mod:`growprune.evolution.run`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from growprune.cli_errors import error_line, explain_instantiation_error, explain_parser_error
from growprune.cli_output import quiet_boilerplate
from growprune.errors import ConfigurationError

DEFAULTS: dict[str, Any] = {
    "data": {"class_path": "growprune.data.DigitsDataModule"},
    "genotype": {"class_path": "growprune.evolution.MaskGenotype"},
    "objective": {"class_path": "growprune.evolution.AccuracyAtSparsity", "init_args": {"sparsity": 0.9}},
    "search": {"class_path": "growprune.evolution.GeneticSearch"},
}


def build_parser() -> ArgumentParser:
    """The ``growprune evolve`` parser: every section with its default (see the module doc)."""
    from growprune.data import GrowPruneDataModule
    from growprune.evolution.evaluator import PopulationEvaluator
    from growprune.evolution.genotypes import Genotype
    from growprune.evolution.objectives import Objective
    from growprune.evolution.pbt import PBTCycles
    from growprune.evolution.search import Search
    from growprune.module import GrowPruneModule

    parser = ArgumentParser(
        prog="growprune evolve",
        description="Evolve pruned versions of a trained network (see growprune.cli_evolve).",
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="config file(s); later ones win")
    parser.add_argument("--resume", type=Optional[str], nargs="?", const="latest", default=None,
                        help="continue the latest run of this name, or the run directory given")
    parser.add_argument("--name", type=str, default="evolve", help="run name: runs go to <root>/<name>/version_<n>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the base network (initial weights, training), the search and the retraining draw")
    parser.add_argument("--generations", type=int, default=10, help="generations to run (PBT: ignored, see pbt.cycles)")
    parser.add_argument("--root", type=str, default="runs/evolve", help="folder of the run directories")
    parser.add_class_arguments(GrowPruneModule, "model", fail_untyped=False)
    parser.add_subclass_arguments(GrowPruneDataModule, "data", default=DEFAULTS["data"])
    parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
    parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
    parser.add_argument("--base.checkpoint", type=Optional[str], default=None,
                        help="a growprune fit checkpoint of the model to prune (null: train one here)")
    parser.add_argument("--base.epochs", type=int, default=10, help="epochs to train the base network for")
    parser.add_subclass_arguments(Genotype, "genotype", default=DEFAULTS["genotype"])
    parser.add_subclass_arguments(Objective, "objective", default=DEFAULTS["objective"])
    parser.add_subclass_arguments(Search, "search", default=DEFAULTS["search"])
    parser.add_class_arguments(PopulationEvaluator, "evaluation")
    parser.add_argument("--retraining.images_per_class", type=Optional[int], default=None,
                        help="the evaluator's retraining samples (evaluation.retrain_steps > 0): this many "
                             "training images of every class, drawn by the seed (null: the whole training split)")
    parser.add_argument("--pbt", type=Optional[PBTCycles], default=None,
                        help="prune/retrain cycles of a population (PBTCycles) instead of plain generations")
    parser.add_argument("--engine", type=str, default="local", help="where evaluations run: local or ray")
    parser.add_argument("--engine_options", type=dict, default={}, help="keyword arguments of the engine")
    parser.add_argument("--chunks", type=int, default=1,
                        help="evaluation tasks per generation (fixed here, not by workers: results do not depend on the engine)")
    parser.add_argument("--wandb.mode", type=Literal["auto", "online", "offline", "disabled"], default="auto",
                        help="auto: online when logged in and reachable, else offline; WANDB_MODE wins")
    parser.add_argument("--wandb.project", type=str, default="growprune", help="W&B project")
    return parser


def _option_names(parser: ArgumentParser) -> dict[str, list[str]]:
    return {"evolve": [action.dest for action in parser._actions]}


def resume_arguments(argv: list[str], command: str = "evolve") -> list[str]:
    """``--resume <run dir>`` without ``-c``: the run's own config.yaml comes first (``growprune
    evolve`` and ``growprune qd`` runs keep it there).

    Raises:
        ConfigurationError: the directory holds no config.yaml (the line names ``command``).
    """
    has_config = any(token in ("-c", "--config") or token.startswith("--config=") for token in argv)
    for index, token in enumerate(argv):
        value = None
        if token == "--resume" and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            value = argv[index + 1]
        elif token.startswith("--resume="):
            value = token.split("=", 1)[1]
        if value is not None and not has_config:
            stored = Path(value) / "config.yaml"
            if not stored.is_file():
                raise ConfigurationError(f"resume: {value} is not {'an' if command[0] in 'aeiou' else 'a'} {command} run directory (no config.yaml in it)")
            return ["-c", str(stored), *argv]
    return argv


def parse(argv: list[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse the command line (``--print_config`` prints and exits here).

    Raises:
        ConfigurationError: one line saying where and what the problem is.
    """
    parser = build_parser()
    try:
        config = parser.parse_args(resume_arguments(list(argv)))
    except ArgumentError as error:
        raise ConfigurationError(explain_parser_error(str(error), _option_names(parser))) from error
    for key, low in (("generations", 1), ("chunks", 1), ("base.epochs", 0), ("seed", 0)):
        if config[key] < low:
            raise ConfigurationError(f"{key}: must be an integer >= {low}, got {config[key]}")
    name = str(config["name"])
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigurationError(f"name: must be a plain folder name (no '/', '..'), got {name!r}")
    images = config["retraining.images_per_class"]
    if images is not None and images < 1:
        raise ConfigurationError(f"retraining.images_per_class: must be >= 1 or null, got {images}")
    return parser, config


def instantiate(parser: ArgumentParser, config: Namespace) -> Namespace:
    """Build every class of the config; the model's initial weights come from ``config.seed``.

    The global torch RNG is seeded inside a fork (restored afterwards), so that two runs with the
    same seed start from the same base network without changing the caller's random state.

    Raises:
        ConfigurationError: a class refused its arguments (the line names its config key).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            return parser.instantiate(config)
        except (ValueError, TypeError, FileNotFoundError, KeyError, ArgumentError) as error:
            raise ConfigurationError(explain_instantiation_error(error, config)) from error


def config_text(parser: ArgumentParser, config: Namespace) -> str:
    """The config as YAML, as the run directory keeps it (without ``--resume``)."""
    dumped = yaml.safe_load(parser.dump(config)) or {}
    dumped.pop("resume", None)
    return yaml.safe_dump(dumped, sort_keys=False)


def evolve_main(argv: list[str]) -> None:
    """``growprune evolve ...``: parse, build, run; bad input exits with code 2 and one line on stderr."""
    from growprune.cli import resolve_data_names
    from growprune.evolution.run import EvolutionRun

    try:
        with quiet_boilerplate():
            parser, config = parse(resolve_data_names(list(argv)))
            text = config_text(parser, config)
            objects = instantiate(parser, config)
            run = EvolutionRun.prepare(config, objects, text, resume=config.resume)
            run.execute()
    except ConfigurationError as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    evolve_main(sys.argv[1:])
