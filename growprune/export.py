"""Export a growprune checkpoint as a plain network for deployment.

``growprune export --ckpt_path X`` (and :func:`export_checkpoint`) loads a checkpoint of ``fit``,
``evolve`` or ``qd`` (masks and structural edits included), makes the masks permanent (weights
multiplied by their masks, no hooks or parametrisations left), folds every batch norm that follows
a convolution or linear layer into it (exact in eval mode) and writes, in a new directory:

* ``model.pt``: ``torch.save({"model": <nn.Module>, "metadata": {...}})``; load it with
  ``torch.load(path, weights_only=False)["model"]`` (the module's classes must be importable);
* ``model.ts``: TorchScript (traced, else scripted), frozen, and ``torch.jit.optimize_for_inference``
  applied when it made the export batch faster; ``torch.jit.load(path)``;
* ``model.onnx``: the legacy TorchScript-based ONNX exporter (``dynamo=False``, needs only the
  ``onnx`` package: ``pip install 'growprune[export]'``), dynamic batch dimension.
* ``export.json``: what was done (folded and unfolded batch norms, sparse layers, files) and, per
  written file, the max abs difference of its outputs from the checkpoint's model on a random batch.

Each written file is loaded back and run on a random batch (seeded); it passes when the max abs
difference is at most ``1e-4 * max(1, max |reference output|)``. The ONNX file is checked with
``onnx.checker`` and run with ``onnxruntime`` when installed, else with ``onnx.reference`` (a NumPy
interpreter: slow on large networks, exact enough for the check).

``sparse=True`` replaces linear and (ungrouped) 2-d convolution layers whose weights are at least
``sparse_threshold`` zeros by :class:`SparseLinear` / :class:`SparseConv2d`, which store the weight
as a CSR tensor and multiply with ``torch.sparse``; this applies to ``model.pt`` (TorchScript and
ONNX cannot hold CSR tensors and stay dense; ``export.json`` says so).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib.util
import io
import json
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

#: the formats ``export_checkpoint`` writes, and their file names
FORMATS = {"module": "model.pt", "torchscript": "model.ts", "onnx": "model.onnx"}
#: a written file passes when max |its output - the checkpoint model's| <= TOLERANCE * max(1, max |reference|)
TOLERANCE = 1e-4

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}


@contextlib.contextmanager
def quiet_jit() -> Iterator[None]:
    """Silence torch's deprecation notices of ``torch.jit`` (it recommends ``torch.export`` on every
    call) and the "beta" notice of CSR tensors, which this module uses on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", message=r"Sparse CSR tensor support is in beta")
        yield


# ------------------------------------------------------------------------------------------ masks
def make_masks_permanent(module: nn.Module) -> nn.Module:
    """Bake pruning masks into the weights, leaving plain parameters and no pruning hooks.

    Handles a :class:`~growprune.GrowPruneModule` (its ``masks`` are multiplied in and cleared),
    ``torch.nn.utils.prune`` reparametrisations (``weight_orig`` / ``weight_mask`` and their forward
    pre-hook) and ``torch.nn.utils.parametrize`` parametrisations (kept at their current value).
    Changes ``module`` in place.

    Returns:
        The plain network: ``module.model`` for a GrowPruneModule, else ``module`` itself.
    """
    from torch.nn.utils import parametrize, prune

    network = module
    masks = getattr(module, "masks", None)
    if isinstance(masks, dict) and hasattr(module, "model"):
        network = module.model
        with torch.no_grad():
            for name, mask in masks.items():
                parameter = network.get_parameter(name)
                parameter.mul_(mask.to(parameter.dtype))
        module.masks = {}
    for layer in network.modules():
        for hook in list(layer._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(layer, hook._tensor_name)
        if parametrize.is_parametrized(layer):
            for name in list(layer.parametrizations.keys()):
                parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    return network


# -------------------------------------------------------------------------------- batch-norm folding
def _fold_pair(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold eval-mode ``norm`` into the conv/linear ``layer`` that feeds it (in place)."""
    with torch.no_grad():
        scale = (norm.running_var + norm.eps).rsqrt()
        shift = -norm.running_mean * scale
        if norm.affine:
            scale = scale * norm.weight
            shift = shift * norm.weight + norm.bias
        weight = layer.weight
        layer.weight.copy_(weight * scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(scale)
        new_bias = (bias * scale + shift).to(weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
        else:
            layer.bias.copy_(new_bias)


def _foldable(layer: nn.Module, norm: nn.Module, output_dim: int | None) -> str | None:
    """Why ``norm`` cannot be folded into ``layer`` (``None``: it can)."""
    if type(layer) not in _BNS:
        return f"fed by {type(layer).__name__}, not a convolution or linear layer"
    if not isinstance(norm, _BNS[type(layer)]):
        return f"{type(norm).__name__} after {type(layer).__name__}"
    if norm.running_mean is None or norm.running_var is None:
        return "no running statistics (track_running_stats=False normalises by batch statistics)"
    if isinstance(layer, nn.Linear) and output_dim != 2:
        return "linear output is not (batch, features): the batch norm normalises another dimension"
    if norm.num_features != layer.weight.shape[0]:
        return f"{norm.num_features} features after {layer.weight.shape[0]} outputs"
    return None


def _output_dims(model: nn.Module, example: torch.Tensor | None) -> dict[str, int]:
    """Number of dimensions of each linear layer's output in one forward pass of ``example``."""
    dims: dict[str, int] = {}
    if example is None:
        return dims
    handles = [layer.register_forward_hook(lambda m, i, o, name=name: dims.__setitem__(name, o.dim()))
               for name, layer in model.named_modules() if isinstance(layer, nn.Linear)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return dims


def _fx_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(producer, batch norm) name pairs where the batch norm is the producer's only consumer, found
    with ``torch.fx``; and the batch norms that cannot be paired, with the reason."""
    import torch.fx

    graph = torch.fx.symbolic_trace(model).graph
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs, left = [], {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            left[node.target] = "its input is not the output of a layer module"
        elif calls[node.target] != 1 or calls[source.target] != 1:
            left[node.target] = "the layer or the batch norm is called more than once"
        elif len(source.users) != 1:
            left[node.target] = f"the output of {source.target!r} is also used elsewhere"
        else:
            pairs.append((source.target, node.target))
    return pairs, left


def fold_batch_norms(model: nn.Module, example_inputs: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` in eval mode with every foldable batch norm folded into its producer.

    A batch norm is folded when ``torch.fx`` shows that its input is the output of a convolution
    (1/2/3-d, any groups) or linear layer that nothing else reads, both called once; the producer
    gets ``W * s`` and ``(b - mean) * s + beta`` (``s = gamma / sqrt(var + eps)``) and the batch norm
    becomes ``nn.Identity``, which is exact in eval mode up to rounding. Linear + ``BatchNorm1d``
    needs ``example_inputs`` to check that the linear output is 2-d. Batch norms that cannot be
    folded (no running statistics, after another operation, a model ``torch.fx`` cannot trace) stay.

    Returns:
        The folded copy; its attribute ``folded_batch_norms`` lists the folded batch norms and
        ``unfolded_batch_norms`` maps each one left in place to the reason.
    """
    folded_model = copy.deepcopy(model).eval()
    norms = [name for name, layer in folded_model.named_modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    folded: list[str] = []
    left: dict[str, str] = {}
    if norms:
        try:
            pairs, left = _fx_pairs(folded_model)
        except Exception as error:  # control flow torch.fx cannot trace: leave them all
            pairs, left = [], {name: f"torch.fx cannot trace the model ({type(error).__name__})" for name in norms}
        dims = _output_dims(folded_model, example_inputs) if any(
            isinstance(folded_model.get_submodule(p), nn.Linear) for p, _ in pairs) else {}
        for producer, norm_name in pairs:
            layer, norm = folded_model.get_submodule(producer), folded_model.get_submodule(norm_name)
            reason = _foldable(layer, norm, dims.get(producer))
            if reason is not None:
                left[norm_name] = reason
                continue
            _fold_pair(layer, norm)
            parent_name, _, attribute = norm_name.rpartition(".")
            setattr(folded_model.get_submodule(parent_name) if parent_name else folded_model, attribute, nn.Identity())
            folded.append(norm_name)
    folded_model.folded_batch_norms = folded
    folded_model.unfolded_batch_norms = left
    return folded_model


# -------------------------------------------------------------------------------- sparse weights
class SparseLinear(nn.Module):
    """``nn.Linear`` whose weight is a CSR tensor: ``y = x @ W.T + b`` with ``torch.sparse.mm``."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("weight", layer.weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


class SparseConv2d(nn.Module):
    """Ungrouped ``nn.Conv2d`` whose weight is a CSR tensor: im2col (``F.unfold``) then ``torch.sparse.mm``."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__()
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError("SparseConv2d takes ungrouped convolutions with numeric zero padding")
        self.out_channels = layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self.register_buffer("weight", layer.weight.detach().reshape(layer.out_channels, -1).to_sparse_csr())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*k*k, L)
        out_h = (height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_w = (width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        # one sparse product for the whole batch: (Cout, C*k*k) @ (C*k*k, N*L)
        stacked = columns.transpose(0, 1).reshape(columns.shape[1], -1)
        out = torch.sparse.mm(self.weight, stacked).reshape(self.out_channels, batch, out_h * out_w).transpose(0, 1)
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, 1)
        return out.reshape(batch, self.out_channels, out_h, out_w)


def sparsify(model: nn.Module, threshold: float = 0.5) -> list[str]:
    """Replace, in place, linear and ungrouped 2-d conv layers with at least ``threshold`` zero weights
    by :class:`SparseLinear` / :class:`SparseConv2d`.

    Returns:
        The names of the replaced layers.

    Raises:
        ValueError: ``threshold`` outside (0, 1].
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"sparse threshold must be in (0, 1], got {threshold}")
    replaced = []
    for name, layer in list(model.named_modules()):
        if type(layer) is nn.Linear:
            sparse_class: type[nn.Module] = SparseLinear
        elif type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
            sparse_class = SparseConv2d
        else:
            continue
        if (layer.weight == 0).float().mean().item() < threshold:
            continue
        parent_name, _, attribute = name.rpartition(".")
        with quiet_jit():
            setattr(model.get_submodule(parent_name) if parent_name else model, attribute, sparse_class(layer))
        replaced.append(name)
    return replaced


# ------------------------------------------------------------------------------------- loading
def load_checkpoint_module(ckpt_path: str | Path) -> Any:
    """The :class:`~growprune.GrowPruneModule` of a growprune checkpoint on the CPU, in eval mode
    (structural edits replayed, masks applied).

    Raises:
        growprune.errors.ConfigurationError: the file is missing, not a Lightning checkpoint, or not a
            growprune module's checkpoint.
    """
    from growprune.cli_errors import check_checkpoint
    from growprune.errors import ConfigurationError
    from growprune.module import GrowPruneModule

    check_checkpoint(str(ckpt_path))
    try:
        module = GrowPruneModule.load_from_checkpoint(str(ckpt_path), map_location="cpu")
    except Exception as error:
        message = " ".join(str(error).split()) or type(error).__name__
        raise ConfigurationError(f"checkpoint {ckpt_path} is not a loadable growprune module: {message[:300]}") from None
    return module.eval()


def _random_batch(input_shape: Sequence[int], batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_shape, generator=generator)


def _max_diff(output: Any, reference: torch.Tensor) -> float:
    return float((torch.as_tensor(output).float() - reference.float()).abs().max())


def _tolerance(reference: torch.Tensor) -> float:
    return TOLERANCE * max(1.0, float(reference.abs().max()))


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _numbered_dir(out_dir: Path) -> Path:
    """``out_dir`` when it does not exist or is empty, else the first free ``out_dir-<n>``."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return out_dir
    index = 1
    while (candidate := out_dir.with_name(f"{out_dir.name}-{index}")).exists():
        index += 1
    return candidate


def _time(run: Any, example: torch.Tensor, passes: int = 5) -> float:
    with torch.no_grad():
        run(example)
        times = []
        for _ in range(passes):
            start = time.perf_counter()
            run(example)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def to_torchscript(model: nn.Module, example: torch.Tensor, optimize: str | bool = "auto") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """TorchScript of eval-mode ``model``: traced on ``example`` (scripted when tracing fails), frozen.

    ``optimize``: ``True`` applies ``torch.jit.optimize_for_inference``, ``False`` does not,
    ``"auto"`` applies it when it gives the same outputs (within :data:`TOLERANCE`) and is faster on
    ``example`` (median of 5 passes).

    Returns:
        The frozen module and a dict describing the choices (``method``, ``optimized``, ``timings_ms``).

    Raises:
        ValueError: ``optimize`` is not True, False or "auto".
    """
    if optimize not in (True, False, "auto"):
        raise ValueError(f"optimize must be True, False or 'auto', got {optimize!r}")
    model = model.eval()
    info: dict[str, Any] = {}
    with torch.no_grad(), quiet_jit():
        try:
            scripted = torch.jit.trace(model, example, check_trace=False)
            info["method"] = "trace"
        except Exception as trace_error:
            try:
                scripted = torch.jit.script(model)
            except Exception:
                raise trace_error from None
            info["method"] = "script"
        frozen = torch.jit.freeze(scripted.eval())
        info["optimized"] = False
        if optimize is False:
            return frozen, info
        try:
            # round trip through a file: some optimised graphs (MKL-DNN constants) save but cannot be loaded
            # (and a loaded one cannot be saved again: the module returned is the one before the round trip)
            # a fresh freeze: optimize_for_inference rewrites the graph in place, and deepcopy shares it
            optimized = torch.jit.optimize_for_inference(torch.jit.freeze(scripted.eval()))
            buffer = io.BytesIO()
            torch.jit.save(optimized, buffer)
            buffer.seek(0)
            reloaded = torch.jit.load(buffer)
            reference = frozen(example)
            same = _max_diff(reloaded(example), reference) <= _tolerance(reference)
        except Exception as error:
            info["optimize_error"] = f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"
            return frozen, info
    if optimize is True:
        if not same:
            raise ValueError("torch.jit.optimize_for_inference changes this model's outputs; use optimize='auto' or False")
        info["optimized"] = True
        return optimized, info
    with quiet_jit():
        frozen_s, optimized_s = _time(frozen, example), _time(reloaded, example)
    info["timings_ms"] = {"frozen": frozen_s * 1e3, "optimized": optimized_s * 1e3}
    if same and optimized_s < frozen_s:
        info["optimized"] = True
        return optimized, info
    return frozen, info


def _run_onnx(path: Path, batch: torch.Tensor) -> tuple[Any, str]:
    """Outputs of the ONNX file on ``batch`` and the runtime used."""
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0], "onnxruntime"
    except ImportError:
        from onnx.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(str(path))
        return evaluator.run(None, {"input": batch.numpy()})[0], "onnx.reference"


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset)


def check_formats(formats: Sequence[str]) -> list[str]:
    """The formats, checked, in order, without repeats.

    Raises:
        ValueError: an unknown format (the message lists the valid ones) or none at all.
    """
    chosen = []
    for name in formats:
        if name not in FORMATS:
            raise ValueError(f"unknown export format {name!r}; valid formats: {', '.join(FORMATS)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no export format given; valid formats: {', '.join(FORMATS)}")
    return chosen


def _write_and_check(name: str, path: Path, network: nn.Module, batches: tuple[torch.Tensor, ...],
                     references: tuple[torch.Tensor, ...], record: dict[str, Any], metadata: dict[str, Any],
                     sparse: bool, sparse_threshold: float, optimize: str | bool, opset: int) -> None:
    """Write format ``name`` of ``network`` to ``path`` (traced on the first batch), load it back,
    run it on every batch and put the file and its largest difference from ``references`` into
    ``record``."""
    batch = batches[0]
    if name == "module":
        saved = network
        if sparse:
            saved = copy.deepcopy(network)
            record["sparse_layers"] = sparsify(saved, sparse_threshold)
            metadata["sparse_layers"] = record["sparse_layers"]
        torch.save({"model": saved, "metadata": metadata}, path)
        loaded = torch.load(path, weights_only=False)["model"].eval()
        with torch.no_grad():
            outputs = [loaded(item) for item in batches]
        check = {}
    elif name == "torchscript":
        scripted, record["torchscript"] = to_torchscript(network, batch, optimize)
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            outputs = [loaded(item) for item in batches]
        check = {"sparse": False} if sparse else {}
    else:
        _write_onnx(network, batch, path, opset)
        runs = [_run_onnx(path, item) for item in batches]
        outputs, runtime = [output for output, _ in runs], runs[0][1]
        check = {"runtime": runtime, "opset": opset, **({"sparse": False} if sparse else {})}
    diffs = [_max_diff(output, reference) for output, reference in zip(outputs, references)]
    tolerances = [_tolerance(reference) for reference in references]
    index = max(range(len(diffs)), key=lambda i: diffs[i] / tolerances[i])
    diff, tolerance = diffs[index], tolerances[index]
    check["batch_sizes"] = [int(item.shape[0]) for item in batches]
    record["files"][name] = str(path)
    record["verification"][name] = {"max_abs_diff": diff, "tolerance": tolerance, "passed": diff <= tolerance, **check}


# ---------------------------------------------------------------------------------------- export
def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path | None = None,
    formats: Sequence[str] = ("module", "torchscript", "onnx"),
    sparse: bool = False,
    batch_size: int = 1,
    fold_bn: bool = True,
    optimize: str | bool = "auto",
    sparse_threshold: float = 0.5,
    opset: int = 17,
    seed: int = 0,
) -> dict[str, Any]:
    """Export a growprune checkpoint: masks permanent, batch norms folded, one file per format.

    Args:
        ckpt_path: a growprune checkpoint (``fit``'s, ``evolve``'s or ``qd``'s ``best.ckpt``).
        out_dir: the directory to write; default ``<checkpoint dir>/export``. An existing non-empty
            directory is never written into: the first free ``<out_dir>-<n>`` is used instead.
        formats: any of ``"module"``, ``"torchscript"``, ``"onnx"``.
        sparse: store layers with at least ``sparse_threshold`` zero weights as CSR tensors in ``model.pt``.
        batch_size: batch size of the tracing example and of the verification batch.
        fold_bn: fold batch norms into their producers.
        optimize: ``torch.jit.optimize_for_inference``: True, False or "auto" (when faster).
        sparse_threshold: zero fraction from which a layer is stored sparse.
        opset: ONNX opset version.
        seed: seed of the random verification batch.

    Returns:
        The content of ``export.json``: ``out_dir``, ``files`` (format -> path), ``verification``
        (format -> ``max_abs_diff``, ``tolerance``, ``passed``, and for ONNX ``runtime``),
        ``folded_batch_norms``, ``unfolded_batch_norms``, ``sparse_layers``, ``torchscript`` info,
        ``input_shape``, ``params``, ``params_nonzero``, ``checkpoint``.

    Raises:
        ValueError: a bad format, batch size or threshold (before anything is written);
            growprune.errors.ConfigurationError: the checkpoint cannot be loaded;
            ImportError: ONNX asked for without the ``onnx`` package (before anything is written);
            RuntimeError: a written file does not reproduce the model's outputs (``export.json`` is
            written first, with the differences).
    """
    chosen = check_formats(formats)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if sparse and not 0 < sparse_threshold <= 1:
        raise ValueError(f"sparse_threshold must be in (0, 1], got {sparse_threshold}")
    if "onnx" in chosen and importlib.util.find_spec("onnx") is None:
        raise ImportError("ONNX export needs the onnx package: pip install 'growprune[export]' "
                          "(or leave onnx out: --formats module,torchscript)")
    ckpt_path = Path(ckpt_path)
    module = load_checkpoint_module(ckpt_path)
    if module.input_shape is None:
        from growprune.errors import ConfigurationError

        raise ConfigurationError(f"checkpoint {ckpt_path} has no input_shape: the export needs one to trace the model")
    input_shape = tuple(module.input_shape)
    batch = _random_batch(input_shape, batch_size, seed)
    # a second batch of another size: a trace that fixed the batch size (ONNX declares it dynamic) fails it
    other_batch = _random_batch(input_shape, batch_size + 2, seed + 1)
    with torch.no_grad():
        reference = module(batch).detach()
        other_reference = module(other_batch).detach()
    network = make_masks_permanent(module).eval()
    if fold_bn:
        network = fold_batch_norms(network, batch)
        folded, unfolded = list(network.folded_batch_norms), dict(network.unfolded_batch_norms)
        del network.folded_batch_norms, network.unfolded_batch_norms
    else:
        folded, unfolded = [], {}
    for layer in network.modules():
        layer._forward_hooks.clear()
        layer._forward_pre_hooks.clear()
    params = sum(p.numel() for p in network.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in network.parameters())

    target = _numbered_dir(Path(out_dir) if out_dir is not None else ckpt_path.parent / "export")
    target.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "checkpoint": str(ckpt_path), "out_dir": str(target), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "input_shape": list(input_shape), "batch_size": batch_size, "seed": seed, "params": params, "params_nonzero": nonzero,
        "folded_batch_norms": folded, "unfolded_batch_norms": unfolded, "sparse": sparse, "sparse_layers": [],
        "files": {}, "verification": {}, "torch": torch.__version__,
    }
    metadata = {key: record[key] for key in ("checkpoint", "input_shape", "folded_batch_norms", "sparse")}
    metadata["hparams"] = {key: value for key, value in dict(module.hparams).items() if _json_able(value)}
    for name in chosen:
        try:
            with quiet_jit():
                _write_and_check(name, target / FORMATS[name], network, (batch, other_batch),
                                 (reference, other_reference), record, metadata, sparse, sparse_threshold, optimize, opset)
        except Exception as error:  # one format failing (an exporter's limit) keeps the others and says why
            record["verification"][name] = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    (target / "export.json").write_text(json.dumps(record, indent=2) + "\n")
    failed = [name for name, check in record["verification"].items() if not check["passed"]]
    if failed:
        details = ", ".join(f"{name}: " + (record["verification"][name]["error"] if "error" in record["verification"][name]
                                           else f"max abs diff {record['verification'][name]['max_abs_diff']:.3g}")
                            for name in failed)
        raise RuntimeError(f"exported files do not reproduce the checkpoint's outputs ({details}); see {target / 'export.json'}")
    return record
