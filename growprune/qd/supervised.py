"""Quality diversity over pruning masks of a trained classifier (LeNet-300-100, LeNet-5, ...).

A solution is the packed bits (``np.packbits``, ``uint8``) of a
:class:`~growprune.evolution.MaskGenotype` genome: one bit per weight of the masked layers (biases
are not masked), layer by layer, row-major. The objective is the accuracy on the selection split
(the data module's validation split by default), measured by
:class:`~growprune.evolution.PopulationEvaluator` (every sample, no racing), optionally after
``retrain_steps`` full-batch SGD steps on ``images_per_class`` training images per class (the
evaluator's deterministic retraining, masks kept).

Descriptors (:meth:`SupervisedMaskTask.descriptor_names`): ``"density"`` / ``"sparsity"`` (kept /
pruned fraction of the masked weights), the graph measures of :mod:`growprune.graph` on the unit
graph of the masked network (the graph is built once per solution, then only the requested
measures are computed), and ``"mi_label"`` / ``"mi_consecutive"`` (:mod:`growprune.information`)
on a fixed probe batch of selection images. Only requested descriptors are computed.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import yaml

from growprune.data import GrowPruneDataModule
from growprune.qd.tasks import Evaluation, QDTask, common_descriptor_names, split_measures

BASE_FILE = "base.ckpt"
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0001}}
INITIAL_KINDS = ("magnitude", "uniform")
SELECTION_SPLITS = ("val", "train")


class SupervisedMaskTask(QDTask):
    """Masks of a trained classifier; objective: selection accuracy (see the module docstring).

    Args:
        model: a registered architecture name (``growprune.models.list_models()``), e.g.
            ``lenet_300_100`` or ``lenet5``; ``num_classes`` / ``input_shape`` come from ``data``.
        model_options: extra keyword arguments of the architecture builder.
        data: the data module (default: the scikit-learn digits, seed 0).
        optimizer: ``{class_path, init_args}`` of the base network's optimizer (default SGD lr 0.05,
            momentum 0.9, weight decay 1e-4).
        base_checkpoint: a ``growprune fit`` checkpoint of the model to prune; ``None``: train the
            base network for ``base_epochs`` in :meth:`bind` (seeded by the run's seed) and save it
            as ``base.ckpt`` in the run directory (a resumed run loads it instead of training).
        base_epochs: epochs of that training.
        layers: shell patterns of the layers to mask (``None``: every weight layer).
        selection: the split the objective is measured on: ``"val"`` or ``"train"``.
        selection_samples: measure on this many of its samples (a subset fixed by the seed); ``None``: all.
        retrain_steps: full-batch SGD steps before scoring each mask (0: no retraining).
        retrain_lr: their learning rate.
        images_per_class: retraining samples: this many training images of every class, drawn by
            the seed (``None``: the whole training split).
        batch_size: samples per forward pass of the evaluator.
        probe_size: selection images (drawn by the seed) the information measures run on.
        bins: bins per variable of the information measures.
        initial: initial masks: ``"magnitude"`` (large weights kept more often) or ``"uniform"``.
        initial_density: the density range initial masks are drawn from (uniformly, one per mask).
        threads: torch threads of an evaluation (``None``: as is).

    Raises:
        ValueError: an argument out of range (named, with the valid values).
    """

    def __init__(
        self,
        model: str = "lenet_300_100",
        model_options: dict[str, Any] | None = None,
        data: GrowPruneDataModule | None = None,
        optimizer: dict[str, Any] | None = None,
        base_checkpoint: str | None = None,
        base_epochs: int = 10,
        layers: list[str] | None = None,
        selection: Literal["val", "train"] = "val",
        selection_samples: int | None = None,
        retrain_steps: int = 0,
        retrain_lr: float = 0.05,
        images_per_class: int | None = None,
        batch_size: int = 1000,
        probe_size: int = 500,
        bins: int = 30,
        initial: Literal["magnitude", "uniform"] = "magnitude",
        initial_density: tuple[float, float] = (0.05, 0.95),
        threads: int | None = None,
    ) -> None:
        if selection not in SELECTION_SPLITS:
            raise ValueError(f"selection must be one of {', '.join(SELECTION_SPLITS)}, got {selection!r}")
        if initial not in INITIAL_KINDS:
            raise ValueError(f"initial must be one of {', '.join(INITIAL_KINDS)}, got {initial!r}")
        for name, value, low in (("base_epochs", base_epochs, 0), ("retrain_steps", retrain_steps, 0),
                                 ("batch_size", batch_size, 1), ("probe_size", probe_size, 1), ("bins", bins, 2)):
            _check_int(name, value, low)
        for name, value in (("selection_samples", selection_samples), ("images_per_class", images_per_class),
                            ("threads", threads)):
            if value is not None:
                _check_int(name, value, 1)
        if images_per_class is not None and retrain_steps == 0:
            raise ValueError(f"images_per_class={images_per_class} needs retrain_steps > 0 (the images are retraining samples)")
        low, high = (float(value) for value in initial_density)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"initial_density must be (low, high) with 0 <= low <= high <= 1, got {tuple(initial_density)}")
        if not retrain_lr > 0:
            raise ValueError(f"retrain_lr must be > 0, got {retrain_lr!r}")
        self.model_name = model
        self.model_options = dict(model_options or {})
        self.data = data
        self.optimizer = dict(optimizer or DEFAULT_OPTIMIZER)
        self.base_checkpoint = base_checkpoint
        self.base_epochs = base_epochs
        self.layers = list(layers) if layers is not None else None
        self.selection = selection
        self.selection_samples = selection_samples
        self.retrain_steps = retrain_steps
        self.retrain_lr = float(retrain_lr)
        self.images_per_class = images_per_class
        self.batch_size = batch_size
        self.probe_size = probe_size
        self.bins = bins
        self.initial = initial
        self.initial_density = (low, high)
        self.threads = threads
        self.seed: int | None = None
        self.base_accuracy: float | None = None
        self._module: Any = None
        self._genotype: Any = None
        self._evaluator: Any = None
        self._template: torch.nn.Module | None = None
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------------------------ binding
    def bind(self, seed: int, run_dir: Path | None = None) -> None:
        """Build (and train, or load) the base network, the mask genotype, the evaluator and the probe.

        The base network comes from ``run_dir/base.ckpt`` when it exists (a resumed run), else from
        ``base_checkpoint`` (copied to ``run_dir/base.ckpt``), else it is trained here for
        ``base_epochs`` with the global torch RNG seeded by ``seed`` inside a fork (the caller's
        random state is restored) and saved to ``run_dir/base.ckpt``.

        Raises:
            ValueError: the model does not fit the data, the checkpoint does not fit the model,
                a class has fewer than ``images_per_class`` training images, ``selection_samples``
                above the split's size.
        """
        from growprune.evolution.data import images_per_class, tensors
        from growprune.evolution.evaluator import PopulationEvaluator
        from growprune.evolution.genotypes import MaskGenotype
        from growprune.evolution.run import accuracy_of, load_lightning_checkpoint
        from growprune.module import GrowPruneModule

        data = self._data_module()
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the base network's initial weights
            module = GrowPruneModule(arch=self.model_name, arch_kwargs=self.model_options or None,
                                     num_classes=data.num_classes, input_shape=data.input_shape, optimizer=self.optimizer)
        stored = Path(run_dir) / BASE_FILE if run_dir is not None else None
        source = stored if stored is not None and stored.is_file() else self.base_checkpoint
        if source is not None:
            load_lightning_checkpoint(module, source)
            if stored is not None and not stored.is_file():
                # a copy in the run directory: a resumed run must not depend on a file that may change
                _copy_atomically(Path(source), stored)
        else:
            self._train_base(module, data, stored)
        module.cpu().eval()
        module.__dict__["_trainer"] = None  # not part of the task (and not picklable)
        data.setup("fit")
        train = tensors(data.train_set)
        validation = tensors(data.val_set)
        self._tensors = {"train": train, "val": validation}
        selected = self._tensors[self.selection]
        if self.selection_samples is not None and self.selection_samples > len(selected[1]):
            raise ValueError(f"selection_samples={self.selection_samples} but the {self.selection} split has "
                             f"{len(selected[1])} samples")
        retrain = None
        if self.retrain_steps > 0:
            retrain = train if self.images_per_class is None else images_per_class(
                *train, self.images_per_class, torch.Generator().manual_seed(self.seed))
        genotype = MaskGenotype(layers=self.layers)
        genotype.bind(module)
        evaluator = PopulationEvaluator(method="full", batch_size=self.batch_size, samples=self.selection_samples,
                                        cache=False, threads=self.threads, retrain_steps=self.retrain_steps,
                                        retrain_lr=self.retrain_lr, seed=self.seed)
        evaluator.bind(module.model, *selected, *(retrain or ()))
        order = torch.randperm(len(selected[1]), generator=torch.Generator().manual_seed(self.seed))
        probe = order[: min(self.probe_size, len(order))]
        self._probe = (selected[0][probe].clone(), selected[1][probe].clone())
        self._module, self._genotype, self._evaluator = module, genotype, evaluator
        self._template = copy.deepcopy(module.model).eval()
        for parameter in self._template.parameters():
            parameter.requires_grad_(False)
        self.base_accuracy = accuracy_of(module.model, *selected)

    def _data_module(self) -> GrowPruneDataModule:
        if self.data is None:
            from growprune.data import DigitsDataModule

            self.data = DigitsDataModule(seed=0)
        return self.data

    def _train_base(self, module: Any, data: GrowPruneDataModule, path: Path | None) -> None:
        from growprune.evolution.run import quiet_trainer, save_checkpoint_atomically

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout, shuffling seeds etc. during base training; restored after
            trainer = quiet_trainer(max_epochs=self.base_epochs, accelerator="cpu", deterministic="warn")
            trainer.fit(module, datamodule=data)
            if path is not None:
                save_checkpoint_atomically(trainer, path, weights_only=False)

    def _require_bound(self) -> None:
        if self._genotype is None:
            raise ValueError("SupervisedMaskTask: call bind(seed, run_dir) first")

    def __getstate__(self) -> dict[str, Any]:
        """What evaluation workers need: the data module and whole splits stay in the driver
        (the evaluator holds the selection and retraining samples, the probe its own batch)."""
        state = dict(self.__dict__)
        state["data"] = None
        state["_tensors"] = {}
        if self._module is not None:
            clone = copy.copy(self._module)  # shallow: shares the network, own attribute dict
            clone.__dict__["_trainer"] = None
            clone.__dict__["_channel_graph"] = None
            state["_module"] = clone
        return state

    # ---------------------------------------------------------------------------------- accessors
    @property
    def genotype(self) -> Any:
        """The bound :class:`~growprune.evolution.MaskGenotype` (genome <-> masks)."""
        self._require_bound()
        return self._genotype

    @property
    def evaluator(self) -> Any:
        """The bound :class:`~growprune.evolution.PopulationEvaluator` that measures the objective."""
        self._require_bound()
        return self._evaluator

    @property
    def solution_dim(self) -> int:
        """Bytes of a packed mask: ``ceil(genes / 8)``."""
        self._require_bound()
        return math.ceil(self._genotype.length / 8)

    @property
    def solution_dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def descriptor_names(self) -> list[str]:
        return common_descriptor_names()

    def base_module(self) -> Any:
        """The trained dense base network (a :class:`~growprune.module.GrowPruneModule`; do not modify it)."""
        self._require_bound()
        return self._module

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The data module's whole training split as ``(inputs, targets)`` (in the process that bound the task)."""
        return self._split("train")

    def validation_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The data module's whole validation split as ``(inputs, targets)`` (in the process that bound the task)."""
        return self._split("val")

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_bound()
        if name not in self._tensors:
            raise ValueError(f"SupervisedMaskTask: the {name} split stays in the process that bound the task")
        return self._tensors[name]

    def probe_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed probe batch (``probe_size`` selection samples drawn by the seed) the
        information descriptors are measured on."""
        self._require_bound()
        assert self._probe is not None
        return self._probe

    def genome(self, solution: np.ndarray) -> np.ndarray:
        """The bool genome of a packed solution.

        Raises:
            ValueError: not a 1-D ``uint8`` array of :attr:`solution_dim` bytes.
        """
        self._require_bound()
        solution = np.asarray(solution)
        if solution.ndim != 1 or solution.dtype != np.uint8 or solution.shape[0] != self.solution_dim:
            raise ValueError(f"a solution must be a 1-D uint8 array of {self.solution_dim} bytes, got "
                             f"{solution.dtype} {solution.shape}")
        return np.unpackbits(solution, count=self._genotype.length).astype(bool)

    def solution(self, genome: np.ndarray) -> np.ndarray:
        """The packed solution of a bool genome (inverse of :meth:`genome`)."""
        self._require_bound()
        self._genotype.check(genome)
        return np.packbits(genome)

    def masks_of(self, solution: np.ndarray) -> dict[str, torch.Tensor]:
        """Parameter name (on :meth:`base_module`'s ``model``) -> float 0/1 mask of a solution."""
        return self._genotype.masks(self.genome(solution))

    # ------------------------------------------------------------------------------------- search
    def initial_solutions(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` masks, each at a density drawn uniformly from ``initial_density``
        (``initial``: magnitude-biased or uniform), packed."""
        self._require_bound()
        low, high = self.initial_density
        genomes = [self._genotype.initial(rng, kind=self.initial, density=float(rng.uniform(low, high)))
                   for _ in range(int(count))]
        return np.stack([np.packbits(genome) for genome in genomes]) if genomes else np.zeros((0, self.solution_dim), np.uint8)

    def evaluate(self, solutions: np.ndarray, descriptors: Sequence[str]) -> list[Evaluation]:
        """Selection accuracy and the requested descriptors of each packed mask (deterministic).

        Raises:
            ValueError: an unknown descriptor, a malformed solution.
        """
        from growprune.evolution.types import EvalRequest, genome_key

        self._require_bound()
        self.check_descriptors(descriptors)
        size_names, graph_names, information_names, _ = split_measures(descriptors)
        genomes = [self.genome(solution) for solution in np.asarray(solutions)]
        requests = [EvalRequest(key=genome_key(genome), masks=self._genotype.masks(genome)) for genome in genomes]
        results = self._evaluator.evaluate(requests) if requests else []
        evaluations = []
        for genome, request, result in zip(genomes, requests, results):
            density = float(np.count_nonzero(genome)) / max(genome.size, 1)
            measures = {"density": density, "sparsity": 1.0 - density}
            measures = {name: measures[name] for name in size_names}
            if graph_names:
                from growprune.graph import graph_measures

                masks = {name: mask != 0 for name, mask in request.masks.items()}
                graph = self._unit_graph(masks)
                measures.update({name: float(value) for name, value in
                                 graph_measures(graph, graph_names, seed=self.seed or 0).items()})
            if information_names:
                from growprune.information import information_measures

                values = information_measures(self._masked_network(request.masks), *self._probe, bins=self.bins)
                measures.update({name: float(values[name]) for name in information_names})
            evaluations.append(Evaluation(objective=float(result.accuracy), measures=measures,
                                          info={"accuracy": float(result.accuracy), "loss": float(result.loss),
                                                "density": density}))
        return evaluations

    def _masked_network(self, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The template network holding the weights the objective saw (masked, retrained if configured)."""
        assert self._template is not None
        if self.retrain_steps > 0:
            weights = self._evaluator.retrained_weights(self._evaluator.model, {n: m != 0 for n, m in masks.items()})
        else:
            weights = {name: self._module.model.get_parameter(name).detach() * mask for name, mask in masks.items()}
        with torch.no_grad():
            for name, parameter in self._template.named_parameters():
                parameter.copy_(weights[name] if name in weights else self._module.model.get_parameter(name).detach())
        return self._template

    def _unit_graph(self, masks: dict[str, torch.Tensor]) -> Any:
        from growprune.graph import unit_graph

        assert self._probe is not None
        return unit_graph(self._module.model, self._probe[0][:1], masks)

    # ------------------------------------------------------------------------------------ outputs
    def network(self, solution: np.ndarray) -> Any:
        """The pruned network: a copy of the base :class:`~growprune.module.GrowPruneModule` with the
        masks applied through ``apply_edit`` (and, with ``retrain_steps``, the retrained weights the
        objective was measured with)."""
        genome = self.genome(solution)
        decoded = self._genotype.decode(self._module, genome)
        if self.retrain_steps > 0:
            from growprune.evolution.run import retrain_like_the_evaluator

            retrain_like_the_evaluator(self._evaluator, self._genotype, genome, decoded)
        return decoded

    def graph(self, solution: np.ndarray) -> Any:
        """The unit graph of the masked base network (neurons / channels; pruned weights absent)."""
        return self._unit_graph({name: mask != 0 for name, mask in self.masks_of(solution).items()})

    def save_elite(self, solution: np.ndarray, path: Path) -> Path:
        """Write :meth:`network` as a Lightning checkpoint ``path`` (e.g. ``best.ckpt``) and, beside
        it, ``validate.yaml``: ``growprune validate -c <dir>/validate.yaml --ckpt_path <path>``
        reloads it. Returns ``path``."""
        from growprune.evolution.run import quiet_trainer, save_checkpoint_atomically

        path = Path(path)
        decoded = self.network(solution).cpu()
        trainer = quiet_trainer(accelerator="cpu")
        data = self._data_module()
        trainer.validate(decoded, dataloaders=data.val_dataloader(), verbose=False)  # attaches the trainer
        save_checkpoint_atomically(trainer, path, weights_only=True)
        path.with_name("validate.yaml").write_text(self.validate_yaml(path))
        return path

    def validate_yaml(self, checkpoint: Path) -> str:
        """The ``growprune validate`` config (model and data sections) of this task's networks."""
        data = self._data_module()
        model: dict[str, Any] = {"arch": self.model_name, "optimizer": self.optimizer}
        if self.model_options:
            model["arch_kwargs"] = self.model_options
        data_section = {"class_path": f"{type(data).__module__}.{type(data).__qualname__}",
                        # plain YAML values (tuples become lists, paths strings)
                        "init_args": json.loads(json.dumps(dict(getattr(data, "hparams", {})), default=str))}
        header = ("# The model and data of this quality-diversity run: reload its best network with\n"
                  f"#   growprune validate -c {checkpoint.with_name('validate.yaml')} --ckpt_path {checkpoint}\n")
        return header + yaml.safe_dump({"model": model, "data": data_section}, sort_keys=False)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _copy_atomically(source: Path, target: Path) -> None:
    import os
    import shutil

    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
