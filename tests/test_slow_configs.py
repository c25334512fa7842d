"""Full-length runs of the shipped CPU configs, checking the results README's "Configs" table documents
(the "measured" column; commands, times and commit in benchmarks/RESULTS.md). Slow: 15 s to minutes
each, run with `make test-slow` (OMP_NUM_THREADS=1 on a shared machine).

Each run is seeded (``seed_everything: 0``); repeated runs at one commit gave identical numbers.
Tolerances: validation accuracy may fall by at most 1.5 points (4 of the 270 digits validation
images, 30 of the 2,000 MNIST ones) below the documented value; a compression that is a target
(magnitude pruning to 95 %) must hold within 1 %, one that is an outcome of the method (NNrelief's
alphas, polarization's histogram valleys, slimming's threshold) within 15 %. Dense FLOPs are recounted
from a freshly built base model, not taken from the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from growprune.cli import main

REPO = Path(__file__).resolve().parents[1]
MNIST = REPO.parent / "shared" / "data" / "mnist-t10k"


@dataclass(frozen=True)
class Documented:
    """What README's Configs table says a full run of the config gives."""

    val_acc: float
    compression: float
    compression_is_target: bool = False
    flops_reduction: float | None = None  # dense FLOPs of the base model / of the final model
    effective_flops: float | None = None  # share of the base model's FLOPs left (masked weights)
    base: tuple[str, dict, tuple[int, ...]] | None = None  # arch, arch kwargs, input shape


DOCUMENTED = {  # README's Configs table = benchmarks/RESULTS.md, measured at commit bb9f83f
    "quickstart": Documented(val_acc=0.9852, compression=1.0, compression_is_target=True),
    "lenet300_magnitude_digits": Documented(val_acc=0.9852, compression=17.3, compression_is_target=True,
                                            effective_flops=0.050),
    "lenet300_nnrelief_digits": Documented(val_acc=0.9852, compression=4.10, effective_flops=0.243),
    "lenet5_nnrelief_digits": Documented(val_acc=0.9963, compression=21.8, effective_flops=0.145),
    "lenet300_nnrelief_mnist": Documented(val_acc=0.9725, compression=3.92, effective_flops=0.255),
    "lenet5_nnrelief_mnist": Documented(val_acc=0.9900, compression=12.7, effective_flops=0.253),
    "lenet300_magnitude_mnist": Documented(val_acc=0.9705, compression=46.5, compression_is_target=True,
                                           effective_flops=0.020),
    "vgg11_polarization_digits": Documented(val_acc=0.9926, compression=23.3, flops_reduction=26.6,
                                            base=("vgg11_bn", {}, (1, 16, 16))),
    "resnet20_slimming_digits": Documented(val_acc=1.0, compression=3.09, flops_reduction=3.21,
                                           base=("resnet20", {"shortcut": "B"}, (1, 16, 16))),
    "vgg11_polarization_mnist": Documented(val_acc=0.9915, compression=23.3, flops_reduction=22.1,
                                           base=("vgg11_bn", {}, (1, 28, 28))),
}


def run_config(name: str, capsys) -> dict:
    arguments = ["fit", "-c", str(REPO / "configs" / f"{name}.yaml"), "--trainer.enable_progress_bar", "false"]
    if "mnist" in name:
        if not MNIST.is_dir():
            pytest.skip(f"the MNIST idx files are not in {MNIST}")
        # the configs name the files relative to the repository root; the test runs in a temporary directory
        arguments += ["--data.init_args.images", str(MNIST / "t10k-images-idx3-ubyte.gz"),
                      "--data.init_args.labels", str(MNIST / "t10k-labels-idx1-ubyte.gz")]
    main(arguments)
    output = capsys.readouterr().out
    return json.loads(Path(output.strip().splitlines()[-1].removeprefix("summary: ")).read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_full_config_gives_the_documented_results(name, capsys):
    documented = DOCUMENTED[name]
    summary = run_config(name, capsys)
    assert summary["val/acc"] >= documented.val_acc - 0.015, summary["val/acc"]
    tolerance = 0.01 if documented.compression_is_target else 0.15
    assert summary["compression"] == pytest.approx(documented.compression, rel=tolerance)
    if documented.effective_flops is not None:
        share = summary["flops/effective"] / summary["flops/dense"]
        assert share == pytest.approx(documented.effective_flops, rel=tolerance, abs=0.005)
    if documented.flops_reduction is not None:
        from growprune.metrics import dense_flops
        from growprune.models import create_model

        arch, kwargs, shape = documented.base
        base_flops = dense_flops(create_model(arch, num_classes=10, in_channels=shape[0], **kwargs), shape)
        assert base_flops / summary["flops/dense"] == pytest.approx(documented.flops_reduction, rel=tolerance)
