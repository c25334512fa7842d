"""The ``growprune qd`` command: MAP-Elites (pyribs) over pruned networks.

    growprune qd -c configs/qd/lenet300_masks_digits.yaml
    growprune qd -c configs/qd/lenet300_masks_digits.yaml --iterations 50 --engine ray
    growprune qd -c configs/qd/lenet300_masks_digits.yaml --resume            # the latest run of that name
    growprune qd --resume runs/qd/lenet300_masks_digits/version_0              # that run, its own config
    growprune qd -c configs/qd/lenet300_masks_digits.yaml --print_config      # every option with its value

The config is parsed like ``growprune evolve``'s (jsonargparse: layered ``-c`` files, dotted
overrides, no abbreviations, bad input as one line ``growprune: error: <where>: <problem>`` with
exit code 2 before any run directory exists). Sections: ``name``, ``seed``, ``iterations``,
``root`` (default ``runs/qd``), ``task`` (a :class:`~growprune.qd.QDTask` class path and its
init_args), ``descriptors`` (names the task measures), ``archive`` (``type: grid`` with ``dims``,
or ``cvt`` with ``cells`` and ``samples``; ``ranges`` one per descriptor; ``qd_score_offset``),
``emitters`` (a list of ``{class_path, init_args, count}``: pyribs emitters or growprune's), ``engine``
/ ``engine_options`` / ``chunks``, ``checkpoint_every`` and ``wandb``. The run itself is
:mod:`growprune.qd.run`.
"""

from __future__ import annotations

import sys
from typing import Any, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from growprune.cli_errors import error_line, explain_parser_error
from growprune.cli_evolve import resume_arguments
from growprune.cli_output import quiet_boilerplate
from growprune.errors import ConfigurationError

#: the task classes growprune ships (any importable QDTask subclass works)
TASKS = ("growprune.qd.SupervisedMaskTask", "growprune.qd.ControlTask")
DEFAULTS: dict[str, Any] = {
    "task": {"class_path": "growprune.qd.SupervisedMaskTask"},
    "emitters": [{"class_path": "growprune.qd.MaskMutationEmitter", "init_args": {}, "count": 1}],
}


def build_parser() -> ArgumentParser:
    """The ``growprune qd`` parser: every section with its default (see the module doc)."""
    from growprune.qd.tasks import QDTask

    parser = ArgumentParser(prog="growprune qd", exit_on_error=False, allow_abbrev=False,
                            description="MAP-Elites over pruned networks (see growprune.cli_qd).")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="config file(s); later ones win")
    parser.add_argument("--resume", type=Optional[str], nargs="?", const="latest", default=None,
                        help="continue the latest run of this name, or the run directory given")
    parser.add_argument("--name", type=str, default="qd", help="run name: runs go to <root>/<name>/version_<n>")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task (base network), archive and emitters")
    parser.add_argument("--iterations", type=int, default=10, help="MAP-Elites iterations (ask, evaluate, tell)")
    parser.add_argument("--root", type=str, default="runs/qd", help="folder of the run directories")
    parser.add_subclass_arguments(QDTask, "task", default=DEFAULTS["task"], required=False)
    parser.add_argument("--descriptors", type=list[str], default=["density"],
                        help="descriptor names (the task lists the valid ones); one archive dimension each")
    parser.add_argument("--archive.type", type=Literal["grid", "cvt"], default="grid", help="grid or cvt")
    parser.add_argument("--archive.dims", type=Optional[list[int]], default=None,
                        help="grid: cells per descriptor (null: 20 each)")
    parser.add_argument("--archive.ranges", type=list[list[float]], default=[[0.0, 1.0]],
                        help="(low, high) of every descriptor")
    parser.add_argument("--archive.cells", type=Optional[int], default=None, help="cvt: number of cells")
    parser.add_argument("--archive.samples", type=int, default=100000, help="cvt: k-means samples of the centroids")
    parser.add_argument("--archive.qd_score_offset", type=float, default=0.0,
                        help="subtracted from objectives in the QD score (e.g. the lowest possible return)")
    parser.add_argument("--emitters", type=list[dict[str, Any]], default=DEFAULTS["emitters"],
                        help="list of {class_path, init_args, count}; archive, task, x0 and seed are injected")
    parser.add_argument("--engine", type=str, default="local", help="where evaluations run: local or ray")
    parser.add_argument("--engine_options", type=dict, default={}, help="keyword arguments of the engine")
    parser.add_argument("--chunks", type=int, default=1,
                        help="evaluation tasks per iteration (fixed here, not by workers: results do not depend on the engine)")
    parser.add_argument("--checkpoint_every", type=int, default=1, help="write state.pkl every this many iterations")
    parser.add_argument("--wandb.mode", type=Literal["auto", "online", "offline", "disabled"], default="auto",
                        help="auto: online when logged in and reachable, else offline; WANDB_MODE wins")
    parser.add_argument("--wandb.project", type=str, default="growprune", help="W&B project")
    return parser


def parse(argv: list[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse the command line (``--print_config`` prints and exits here).

    Raises:
        ConfigurationError: one line saying where and what the problem is; also when pyribs is
            missing (naming the extra to install).
    """
    from growprune.qd.run import require_ribs

    require_ribs()
    parser = build_parser()
    try:
        config = parser.parse_args(resume_arguments(list(argv), command="qd"))
    except ArgumentError as error:
        message = explain_parser_error(str(error), {"qd": [a.dest for a in parser._actions]})
        if message.startswith("task:") and "class_path" in message:
            message += f" (growprune's tasks: {', '.join(TASKS)}, or any growprune.qd.QDTask subclass)"
        raise ConfigurationError(message) from error
    for key, low in (("iterations", 1), ("chunks", 1), ("checkpoint_every", 1), ("seed", 0)):
        if config[key] < low:
            raise ConfigurationError(f"{key}: must be an integer >= {low}, got {config[key]}")
    name = str(config["name"])
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigurationError(f"name: must be a plain folder name (no '/', '..'), got {name!r}")
    return parser, config


def instantiate_config(argv: list[str]) -> tuple[Namespace, Namespace]:
    """Parse ``argv`` and build its classes (the task); ``(config, objects)``.

    Raises:
        ConfigurationError: bad input (one line).
    """
    from growprune.cli_evolve import instantiate

    parser, config = parse(argv)
    return config, instantiate(parser, config)


def qd_main(argv: list[str]) -> None:
    """``growprune qd ...``: parse, build, run; bad input exits with code 2 and one line on stderr."""
    from growprune.cli_evolve import config_text, instantiate
    from growprune.qd.run import QDRun

    try:
        with quiet_boilerplate():
            parser, config = parse(list(argv))
            text = config_text(parser, config)
            objects = instantiate(parser, config)
            run = QDRun.prepare(config, objects.task, text, resume=config.resume)
            run.execute()
    except ConfigurationError as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    qd_main(sys.argv[1:])
