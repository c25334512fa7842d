"""GrowPruneModule: the LightningModule that wraps any ``nn.Module`` for growing and pruning.

The module owns everything that describes the *current* network beyond its weights, so that a
checkpoint alone can rebuild it: the weight masks of unstructured pruning and the edit log of
typed edits (:mod:`growprune.surgery.edits`). Every change goes through :meth:`GrowPruneModule.apply_edit`
(strategies use it too): it applies the edit, logs it, carries masks and, during training, repairs
the optimizer. Loading a checkpoint replays the logged structural edits on the base architecture
and checks the result against the stored tensor shapes.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from growprune.factories import NOT_STORED, build_factory, describe_factory
from growprune.metrics import SizeMeter, count_parameters
from growprune.modes import evaluating, preserved_modes
from growprune.models import create_model
from growprune.surgery.channels import ChannelGraph
from growprune.surgery.edits import Edit, EditContext, EditResult, replay, structural_entries
from growprune.surgery.optimizer import carry_masks, mask_optimizer_state, repair_training
from growprune.surgery.resize import resize_to_state_dict


def default_optimizer(params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """Adam with learning rate 1e-3: the default when no optimizer is configured."""
    return torch.optim.Adam(params, lr=1e-3)


class GrowPruneModule(pl.LightningModule):
    """Trains a classifier and keeps the bookkeeping growing and pruning need.

    Args:
        arch: a registered model name (see ``growprune.models.list_models()``) or an ``nn.Module``
            (in YAML: a ``class_path`` to any module class, yours included).
        arch_kwargs: extra keyword arguments for the model builder (when ``arch`` is a name).
        num_classes: number of classes; linked from the data module under the CLI.
        input_shape: shape of one input sample, e.g. ``(1, 28, 28)``; linked from the data module
            under the CLI. Used to check model/data compatibility before training and to count FLOPs.
        optimizer: a callable that builds the optimizer from the parameters (in YAML, an optimizer
            ``class_path`` with ``init_args`` minus ``params``). It is called again after every
            structural change, which keeps the optimizer in step with the network. The
            hyper-parameters (and so checkpoints) store it as a ``{"class_path", "init_args"}``
            mapping or a dotted path, which this argument also accepts, so checkpoints load with
            ``torch.load(weights_only=True)`` (see :mod:`growprune.factories`: a lambda or local
            function cannot be stored; then pass ``optimizer=`` to ``load_from_checkpoint``).
        lr_scheduler: optional callable that builds an LR scheduler from the optimizer (stored
            like ``optimizer``).
        lr_scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        monitor: metric that ``ReduceLROnPlateau`` schedulers watch.
        mask_gradients: also mask gradients before each optimizer step, so momentum and Adam
            moments of pruned weights stay exactly zero (useful before regrowing weights). Off by
            default: masking the weights after each step already keeps them exactly zero, and the
            second pass costs about 8 % of a LeNet-300-100 step (benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        arch: str | nn.Module = "lenet_300_100",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        input_shape: Sequence[int] | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: str = "epoch",
        monitor: str = "val/loss",
        mask_gradients: bool = False,
    ):
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # built (and refused) before anything is stored: a description from a checkpoint becomes a callable here
        optimizer_factory = build_factory(optimizer, "optimizer", "optimizer")
        lr_scheduler_factory = build_factory(lr_scheduler, "lr_scheduler", "lr_scheduler")
        self.save_hyperparameters(ignore=["arch"] if isinstance(arch, nn.Module) else None)
        self._store_factory_descriptions()
        self.input_shape = tuple(int(size) for size in input_shape) if input_shape is not None else None
        self.model = self._build_model(arch, arch_kwargs or {}, num_classes, self.input_shape)
        self.optimizer_factory = optimizer_factory
        self.lr_scheduler_factory = lr_scheduler_factory
        self.lr_scheduler_interval = lr_scheduler_interval
        self.monitor = monitor
        self.mask_gradients = mask_gradients
        self.original_params = count_parameters(self.model)
        # Unstructured masks: parameter name -> tensor of 0/1 of the parameter's shape and dtype.
        self._masks: dict[str, torch.Tensor] = {}
        self._mask_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # One record per action, in order (JSON-serialisable dicts; each lists its typed edits
        # under "ops"); the structural edits are replayed on load.
        self.edit_log: list[dict[str, Any]] = []
        self._channel_graph: ChannelGraph | None = None
        self._size_meter = SizeMeter(self.input_shape, self.original_params) if self.input_shape else None
        # see original_flops: counted on first use (before the network first changes)
        self._original_flops: float | None = None
        if self.input_shape is not None:
            self._check_shapes(num_classes)
            # lets Lightning's model summary show input/output sizes and FLOPs
            self.example_input_array = torch.zeros(1, *self.input_shape)

    # ----------------------------------------------------------------------------------- set-up
    def _store_factory_descriptions(self) -> None:
        """Replace the optimizer and scheduler callables in the hyper-parameters by descriptions
        that load with ``weights_only=True`` (the command line's config already is one)."""
        for key in ("optimizer", "lr_scheduler"):
            value = self.hparams.get(key)
            if value is None or isinstance(value, (str, dict)):
                continue
            description = describe_factory(value, key)
            if isinstance(description, dict) and NOT_STORED in description:
                rank_zero_warn(
                    f"GrowPruneModule: {key} {description[NOT_STORED]} cannot be stored in checkpoints (only importable "
                    f"classes, functools.partial of them with plain arguments, and importable functions annotated "
                    f"to return one can); to load a checkpoint, pass it again: load_from_checkpoint(path, {key}=...)"
                )
            self._hparams[key] = description
            self._hparams_initial[key] = copy.deepcopy(description)

    @property
    def hparams_initial(self) -> Any:
        """Hyper-parameters for the loggers; the data module's own values win for linked shapes.

        The CLI links ``num_classes`` and ``input_shape`` from the data; Lightning refuses to log
        a key that both hold with different types (a YAML list vs a tuple), so log the data's.
        """
        hparams = super().hparams_initial
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        datamodule_hparams = getattr(datamodule, "hparams_initial", {}) if datamodule is not None else {}
        for key in ("num_classes", "input_shape"):
            if key in datamodule_hparams:
                hparams.pop(key, None)
        return hparams

    @staticmethod
    def _build_model(
        arch: str | nn.Module, arch_kwargs: dict[str, Any], num_classes: int | None, input_shape: tuple | None
    ) -> nn.Module:
        """The model ``arch`` for the data's shapes: ``num_classes``, ``in_channels`` and (3-D inputs)
        ``image_size`` go to the registered builder, which receives only those it declares (see
        :func:`growprune.models.create_model`; torchvision models pass the size on only to the classes
        that take one). ``arch_kwargs`` go to the builder too and win over these."""
        if isinstance(arch, nn.Module):
            if arch_kwargs:
                raise ValueError("arch_kwargs only applies when arch is a registered model name")
            return arch
        if not isinstance(arch, str):
            raise TypeError(f"arch must be a model name or an nn.Module, got {type(arch).__name__}")
        shape_kwargs: dict[str, Any] = {}
        if num_classes is not None:
            shape_kwargs["num_classes"] = num_classes
        if input_shape is not None:
            shape_kwargs["in_channels"] = input_shape[0]
            if len(input_shape) == 3:
                shape_kwargs["image_size"] = tuple(input_shape[1:])
        return create_model(arch, **{**shape_kwargs, **arch_kwargs})

    def _check_shapes(self, num_classes: int | None) -> None:
        """Fail before training when the model cannot take the data's inputs or emits the wrong classes."""
        name = self.hparams.get("arch", type(self.model).__name__)
        if not isinstance(name, str):
            name = type(self.model).__name__
        probe = torch.zeros(2, *self.input_shape)
        try:
            with evaluating(self.model):
                output = self.model(probe)
        except RuntimeError as error:
            raise ValueError(
                f"model {name!r} cannot take inputs of shape {self.input_shape} from the data: {error}"
            ) from error
        if num_classes is not None and tuple(output.shape) != (2, num_classes):
            raise ValueError(
                f"model {name!r} outputs shape {tuple(output.shape[1:])} per sample but the data has "
                f"{num_classes} classes"
            )

    # --------------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        on_step = stage == "train"
        batch_size = targets.shape[0]
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=not on_step)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=batch_size, sync_dist=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train") + self.extra_loss()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def extra_loss(self) -> torch.Tensor | float:
        """Sum of the penalties that strategies registered with :meth:`add_loss_term` (0 if none)."""
        terms = getattr(self, "_loss_terms", {})
        return sum((term(self) for term in terms.values()), 0.0)

    def add_loss_term(self, name: str, term: Callable[["GrowPruneModule"], torch.Tensor]) -> None:
        """Register a penalty added to the training loss (regularised pruning); same name replaces."""
        if not hasattr(self, "_loss_terms"):
            self._loss_terms: dict[str, Callable] = {}
        self._loss_terms[name] = term

    def remove_loss_term(self, name: str) -> None:
        """Stop adding the penalty registered as ``name``."""
        getattr(self, "_loss_terms", {}).pop(name, None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Masked gradients keep momentum and Adam moments of pruned weights at zero, so a pruned
        # weight carries no stale history (matters once growth can revive it).
        if self.mask_gradients and self._masks:
            parameters, masks = self._masked_pairs()
            pairs = [(p.grad, mask) for p, mask in zip(parameters, masks) if p.grad is not None]
            if pairs:
                torch._foreach_mul_([grad for grad, _ in pairs], [mask for _, mask in pairs])

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after every step, so pruned weights stay exactly zero whatever the optimizer does
        # (momentum, Adam moments, weight decay would otherwise revive them).
        self.apply_masks()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.lr_scheduler_interval}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return {"optimizer": optimizer, "lr_scheduler": config}

    # ------------------------------------------------------------------------------------ masks
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> 0/1 mask. Assign a new dict (or use :meth:`set_mask`) to change them."""
        return self._masks

    @masks.setter
    def masks(self, value: dict[str, torch.Tensor]) -> None:
        """Replace all masks and zero the masked weights now (so size metrics read right after are right)."""
        checked = {}
        for name, mask in dict(value).items():
            parameter = self.model.get_parameter(name)
            if mask.shape != parameter.shape:
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(parameter.shape)}")
            checked[name] = mask.detach().to(device=parameter.device, dtype=parameter.dtype)
        self._masks = checked
        self.invalidate_mask_cache()
        self.apply_masks()

    def invalidate_mask_cache(self) -> None:
        """Forget the cached (parameter, mask) pairs; call after replacing parameter objects."""
        self._mask_pairs = None

    def _masked_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # Looking parameters up by name costs more than the masking itself: cache the pairs.
        if self._mask_pairs is None:
            parameters = [self.model.get_parameter(name) for name in self._masks]
            self._mask_pairs = (parameters, list(self._masks.values()))
        return self._mask_pairs

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Set the 0/1 mask of parameter ``name`` and zero the masked weights now."""
        parameter = self.model.get_parameter(name)
        if mask.shape != parameter.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, parameter has {tuple(parameter.shape)}")
        self._masks[name] = mask.detach().to(device=parameter.device, dtype=parameter.dtype).clone()
        self.invalidate_mask_cache()
        with torch.no_grad():
            parameter.mul_(self._masks[name])

    def apply_masks(self) -> None:
        """Multiply every masked parameter by its mask (one fused call for all of them)."""
        if not self._masks:
            return
        parameters, masks = self._masked_pairs()
        with torch.no_grad():
            torch._foreach_mul_(parameters, masks)

    # ------------------------------------------------------------------------------------ edits
    def example_inputs(self) -> torch.Tensor:
        """One zero sample of the data's input shape, on the model's device (for tracing and probing)."""
        if self.input_shape is None:
            raise ValueError("this needs the module's input_shape (the data module's input shape)")
        parameter = next(self.model.parameters(), None)
        return torch.zeros(1, *self.input_shape, device=parameter.device if parameter is not None else None)

    def channel_graph(self) -> ChannelGraph:
        """The model's channel groups and channel surgery, checked by a dry run; rebuilt after the model changed."""
        graph = self._channel_graph
        if graph is None or graph.model is not self.model or not graph.is_current():
            graph = self._channel_graph = ChannelGraph(self.model, self.example_inputs())
        return graph

    def permissible_elements(self, channel_groups: bool = True) -> Any:
        """Every permissible element of the network: channel groups, layers, cells, insertion points
        (:func:`growprune.surgery.discovery.permissible_elements`, with this module's channel graph;
        ``channel_groups=False`` skips it, for models channel surgery cannot handle)."""
        from growprune.surgery.discovery import permissible_elements

        graph = self.channel_graph() if channel_groups else None
        return permissible_elements(self.model, self.example_inputs(), channel_groups=channel_groups, graph=graph)

    def apply_edit(self, edit: Edit, log: bool = True, info: dict[str, Any] | None = None) -> EditResult:
        """Apply a typed edit (:mod:`growprune.surgery.edits`) to the network, from anywhere.

        The edit is applied in place (modes and ``requires_grad`` flags are kept); masks follow
        the tensors they belong to; during training the optimizer is rebuilt with its state carried
        (sliced, zero-padded, renamed) and the LR schedule kept, and every strategy is told
        (``Strategy.on_edit``). With ``log`` the edit is appended to :attr:`edit_log` as one record
        (``info`` adds fields to it). Under DDP, call it on every rank with the same edit.
        Bad edits raise ``ValueError`` before the network changes.
        """
        if not isinstance(edit, Edit):
            raise TypeError(f"apply_edit needs a growprune.surgery.edits.Edit, got {type(edit).__name__}")
        _ = self.original_flops  # counted on the network as it is before its first change
        context = EditContext(self.example_inputs(), graph_factory=lambda model: self.channel_graph())
        with preserved_modes(self.model):
            result = edit.apply(self.model, context)
        trainer = self._trainer if self._trainer is not None and self._trainer.optimizers else None
        if result.structural:
            self._channel_graph = context.graph if context.graph is not None and context.graph.is_current() else None
            if trainer is not None:
                repair_training(trainer, self, result)
            else:
                carry_masks(self, result.changes, result.renamed)
                self.invalidate_mask_cache()
        for name, mask in result.masks.items():
            self.set_mask(name, mask)
            if trainer is not None:
                mask_optimizer_state(trainer.optimizers, self.model.get_parameter(name), self._masks[name])
        if self._trainer is not None:
            for callback in self._trainer.callbacks:
                if callable(getattr(callback, "on_edit", None)):
                    callback.on_edit(self._trainer, self, edit, result)
        if log:
            self.edit_log.append({"action": "edit", **(info or {}), "ops": [edit.to_dict()]})
        return result

    def _replay_edits(self, edit_log: list[dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> None:
        """Bring the model to the architecture a checkpoint was saved with, by replaying its edit log."""
        stored = structural_entries(edit_log)
        if not stored:
            return  # nothing structural was logged: shapes, if different, are resized on load
        current = structural_entries(self.edit_log)
        if current == stored[: len(current)]:
            todo = stored[len(current):]
        elif isinstance(self.hparams.get("arch"), str):
            # the module's network went elsewhere: start again from a freshly built base architecture
            self.model = self._build_model(self.hparams["arch"], self.hparams.get("arch_kwargs") or {},
                                           self.hparams.get("num_classes"), self.input_shape)
            todo = stored
        else:
            raise ValueError("the checkpoint's edit log does not continue this module's edits, and the base "
                             "architecture cannot be rebuilt (arch is an nn.Module instance): load it into a fresh module")
        replay(self.model, todo, self.example_inputs())
        self._channel_graph = None
        self.invalidate_mask_cache()
        replayed = self.model.state_dict()
        for key, tensor in state_dict.items():
            if not key.startswith("model."):
                continue
            name = key[len("model."):]
            here = replayed.get(name)
            if here is None or tuple(here.shape) != tuple(tensor.shape):
                shape = "missing" if here is None else f"of shape {tuple(here.shape)}"
                raise ValueError(f"replaying the checkpoint's edit log does not rebuild its architecture: {name!r} is "
                                 f"{shape} after replay but {tuple(tensor.shape)} in the checkpoint")

    # ------------------------------------------------------------------------------ size metrics
    @property
    def original_flops(self) -> float | None:
        """Dense FLOPs (one sample) of the network as built, before any edit; ``None`` without ``input_shape``.

        Counted on first use, at the latest just before the first edit or checkpoint load changes
        the network (building a module costs no FLOP count), and kept in checkpoints, so a
        reloaded pruned network still reports the count of its original.
        """
        if self._original_flops is None and self._size_meter is not None:
            self._original_flops = self._size_meter.dense_flops(self.model)
        return self._original_flops

    def size_metrics(self, include_original: bool = False) -> dict[str, float]:
        """``params/total``, ``params/nonzero``, ``flops/dense``, ``flops/effective``, ``compression``;
        with ``include_original`` also ``params/original``, ``flops/original`` (the network as built,
        kept in checkpoints) and ``flops/reduction`` (original / current dense FLOPs)."""
        if self._size_meter is None:
            raise RuntimeError("size metrics need input_shape (the data module's input shape)")
        if include_original:
            self._size_meter.original_flops = self.original_flops
        return self._size_meter(self.model, include_original=include_original)

    def _log_size_metrics(self) -> None:
        if self._size_meter is not None and not self.trainer.sanity_checking:
            self.log_dict(self.size_metrics(), on_epoch=True, sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_end(self) -> None:
        self._log_size_metrics()

    def on_test_epoch_end(self) -> None:
        self._log_size_metrics()

    # ------------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load weights, first resizing layers whose shapes were changed by structural surgery."""
        if self._original_flops is None:
            current = self.model.state_dict()
            stored = {key[len("model."):]: value for key, value in state_dict.items() if key.startswith("model.")}
            if any(name not in current or current[name].shape != value.shape for name, value in stored.items()):
                _ = self.original_flops  # the network as built, before it takes the stored shapes
        if resize_to_state_dict(self.model, state_dict, prefix="model."):
            self.invalidate_mask_cache()
            self._size_meter = SizeMeter(self.input_shape, self.original_params, self._original_flops) if self.input_shape else None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["growprune"] = {
            "masks": {name: mask.detach().to(torch.bool).cpu() for name, mask in self.masks.items()},
            "edit_log": list(self.edit_log),
            "original_params": self.original_params,
            "original_flops": self.original_flops,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("growprune")
        if state is None:
            return
        if state.get("original_flops") is not None:
            self._original_flops = float(state["original_flops"])
        else:
            _ = self.original_flops  # an older checkpoint: count the network as built, before the replay
        edit_log = list(state.get("edit_log", []))
        self._replay_edits(edit_log, checkpoint.get("state_dict", {}))
        self.edit_log = edit_log
        self.original_params = int(state.get("original_params", self.original_params))
        if self._size_meter is not None:
            self._size_meter.original_params = self.original_params
            self._size_meter.original_flops = self._original_flops
        masks = {}
        for name, mask in state.get("masks", {}).items():
            parameter = self.model.get_parameter(name)
            masks[name] = mask.to(device=parameter.device, dtype=parameter.dtype)
        self.masks = masks
