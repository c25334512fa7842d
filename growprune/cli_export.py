"""``growprune export``: a checkpoint as a plain module, TorchScript and ONNX (see :mod:`growprune.export`).

    growprune export --ckpt_path runs/fit/version_0/checkpoints/last.ckpt [--out DIR]
        [--formats module,torchscript,onnx] [--sparse] [--batch_size 1]

Bad input (a missing or unreadable checkpoint, an unknown format, a bad number) exits with code 2
and one ``growprune: error: ...`` line, before anything is written. An export whose files do not
reproduce the checkpoint's outputs exits with code 1 (``export.json`` holds the differences).
"""

from __future__ import annotations

import argparse
import sys

from growprune.cli_errors import error_line
from growprune.errors import ConfigurationError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2 (argparse's own usage dump is long)
        raise ConfigurationError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``growprune export``."""
    from growprune.export import FORMATS

    parser = _Parser(prog="growprune export", allow_abbrev=False,
                     description="Export a growprune checkpoint: masks made permanent, batch norms folded, "
                                 "a plain nn.Module (model.pt), TorchScript (model.ts) and ONNX (model.onnx), "
                                 "each checked against the checkpoint's model (export.json).")
    parser.add_argument("--ckpt_path", required=True, help="the checkpoint (fit, evolve or qd best.ckpt)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: <checkpoint dir>/export; never overwritten: <out>-<n> instead)")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help=f"comma-separated formats among {', '.join(FORMATS)} (default: all)")
    parser.add_argument("--sparse", action="store_true",
                        help="store layers with at least --sparse_threshold zero weights as CSR tensors in model.pt")
    parser.add_argument("--sparse_threshold", type=float, default=0.5, help="zero fraction from which a layer is sparse")
    parser.add_argument("--batch_size", type=int, default=1, help="batch size of the tracing and verification batch")
    parser.add_argument("--no_fold_bn", action="store_true", help="keep batch norms as they are")
    parser.add_argument("--optimize", choices=["auto", "on", "off"], default="auto",
                        help="torch.jit.optimize_for_inference: auto (when faster), on, off")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random verification batch")
    return parser


def export_main(argv: list[str]) -> int:
    """Run ``growprune export`` with ``argv`` (the arguments after ``export``).

    Returns:
        0 when every file was written and verified, 1 when a file does not reproduce the model's
        outputs, 2 for bad input (one line on stderr, nothing written).
    """
    from growprune.export import check_formats, export_checkpoint

    try:
        args = build_parser().parse_args(argv)
        formats = check_formats([name.strip() for name in args.formats.split(",") if name.strip()])
        if args.batch_size < 1:
            raise ConfigurationError(f"--batch_size must be >= 1, got {args.batch_size}")
        if not 0 < args.sparse_threshold <= 1:
            raise ConfigurationError(f"--sparse_threshold must be in (0, 1], got {args.sparse_threshold}")
        optimize = {"auto": "auto", "on": True, "off": False}[args.optimize]
        record = export_checkpoint(args.ckpt_path, args.out, formats, sparse=args.sparse, batch_size=args.batch_size,
                                   fold_bn=not args.no_fold_bn, optimize=optimize, sparse_threshold=args.sparse_threshold,
                                   opset=args.opset, seed=args.seed)
    except (ConfigurationError, ValueError, ImportError) as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        print(f"growprune: error: {error_line(error)}", file=sys.stderr)
        return 1
    for name, check in record["verification"].items():
        print(f"{name}: {record['files'][name]} (max abs diff {check['max_abs_diff']:.2e})")
    folded, unfolded = len(record["folded_batch_norms"]), len(record["unfolded_batch_norms"])
    print(f"batch norms folded: {folded}" + (f", left: {unfolded} (see export.json)" if unfolded else ""))
    if record["sparse_layers"]:
        print(f"sparse layers in model.pt: {len(record['sparse_layers'])}")
    print(f"summary: {record['out_dir']}/export.json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(export_main(sys.argv[1:]))
