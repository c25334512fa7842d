"""Benchmark suite files: parsing with line numbers, validation, grid expansion.

A suite file (``benchmarks/suites/<name>.yaml``, format in ``benchmarks/suites/README.md``) names a
grid of (model, data, method, target, seed). :func:`load_suite` reads it, checks every key and value
of the suite's own schema (an error names the file, the line, the key and the valid keys), expands
the grid in a stable order (model, data, method, target, seed), substitutes the placeholders
``${seed}``, ``${target}``, ``${sparsity}`` and ``${density}`` and, unless told not to, parses each
entry's resolved config with the command's own parser (without building anything), so a typo
inside a command config is found before any entry runs.

    suite = load_suite("smoke")                   # benchmarks/suites/smoke.yaml under the cwd
    for entry in suite.entries:
        print(entry.label, entry.key)             # e.g. dense/lenet300/digits/tnone/s0 3f2a...
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

#: growprune commands a suite can run per entry
COMMANDS = ("fit", "evolve", "qd", "latency")
#: baseline kinds a method can declare; ``require_baselines`` asks for all of them
BASELINES = ("random", "global_magnitude", "layer_magnitude", "dense_same_size")
TOP_KEYS = ("name", "description", "command", "base", "config", "seeds", "targets", "models", "datasets",
            "methods", "require_baselines", "report", "wandb")
METHOD_KEYS = ("config", "targets", "baseline", "models", "datasets", "description")
REPORT_KEYS = ("metrics", "plots", "title")
WANDB_KEYS = ("project", "entity", "tags")
#: placeholders substituted at grid time; ``${width}`` is left for the entry to resolve at run time
PLACEHOLDERS = ("seed", "target", "sparsity", "density", "width")
DEFAULT_DIRECTORY = Path("benchmarks") / "suites"

_PLACEHOLDER = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_REQUIRED = ("seeds", "models", "datasets", "methods")

KeyPath = tuple[Any, ...]


@dataclass(frozen=True)
class Entry:
    """One grid point of a suite: a command run with a fully resolved config.

    Attributes:
        suite: the suite's name.
        command: the growprune command the entry runs (``fit``, ``evolve``, ``qd``, ``latency``).
        model, data, method: names from the suite's ``models``, ``datasets`` and ``methods``.
        target: the compression / FLOPs-reduction factor, or ``None`` for an untargeted method.
        seed: the entry's seed.
        baseline: the method's baseline kind or ``None``.
        config: the resolved config (JSON-able), without output locations.
        wandb: the suite's ``wandb`` section.
    """

    suite: str
    command: str
    model: str
    data: str
    method: str
    target: float | None
    seed: int
    baseline: str | None
    config: dict[str, Any] = field(hash=False)
    wandb: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def key(self) -> str:
        """First 12 hex digits of the sha256 of the canonical JSON of ``{"command", "config"}``.

        The target is hashed too wherever it is used at run time rather than written into the
        config: ``${width}`` (resolved when the entry runs), ``latency`` entries (their default
        pruning amount), and baseline entries (with their ``baseline`` kind). Elsewhere the target
        only acts through placeholders the config already holds, so two targets whose configs read
        the same are refused as duplicates instead of silently sharing a result.
        """
        payload: dict[str, Any] = {"command": self.command, "config": self.config}
        uses_target = self.baseline is not None or self.command == "latency" or "${width}" in json.dumps(self.config)
        if uses_target:
            payload.update(baseline=self.baseline, target=self.target)
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def label(self) -> str:
        """``method/model/data/t<target or none>/s<seed>``, readable and unique within a suite."""
        return f"{self.method}/{self.model}/{self.data}/t{self.target or 'none'}/s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The fields plus ``key`` and ``label`` (what ``entry.json`` holds); JSON-able."""
        return {
            "suite": self.suite, "command": self.command, "model": self.model, "data": self.data,
            "method": self.method, "target": self.target, "seed": self.seed, "baseline": self.baseline,
            "config": self.config, "wandb": self.wandb, "key": self.key, "label": self.label,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Entry":
        """The entry :meth:`to_dict` wrote (``key`` and ``label`` are recomputed, not read)."""
        return cls(**{name: data[name] for name in ("suite", "command", "model", "data", "method", "target",
                                                    "seed", "baseline", "config", "wandb")})


@dataclass(frozen=True)
class MethodSpec:
    """A suite's method: config overrides, its targets (``[None]``: untargeted) and restrictions."""

    name: str
    config: dict[str, Any]
    targets: tuple[float | None, ...]
    baseline: str | None
    models: tuple[str, ...] | None
    datasets: tuple[str, ...] | None
    description: str


@dataclass(frozen=True)
class Suite:
    """A validated suite file and its grid (see the module doc)."""

    name: str
    path: Path
    description: str
    command: str
    base: str | None
    config: dict[str, Any]
    seeds: tuple[int, ...]
    targets: tuple[float, ...]
    models: dict[str, dict[str, Any]]
    datasets: dict[str, dict[str, Any]]
    methods: dict[str, MethodSpec]
    require_baselines: bool
    report: dict[str, Any]
    wandb: dict[str, Any]
    entries: tuple[Entry, ...]
    lines: dict[KeyPath, int] = field(repr=False, compare=False)

    def line_of(self, path: KeyPath) -> int | None:
        """The 1-based line where ``path`` (a tuple of keys / list indices) was written, if known."""
        return self.lines.get(tuple(path))


class _Located:
    """Formats one-line errors as ``<file>:<line>: <problem>``."""

    def __init__(self, path: Path, lines: dict[KeyPath, int]):
        self.path, self.lines = path, lines

    def where(self, key_path: KeyPath) -> str:
        key_path = tuple(key_path)
        while key_path and key_path not in self.lines:
            key_path = key_path[:-1]
        line = self.lines.get(key_path)
        return f"{self.path}:{line}" if line is not None else str(self.path)

    def error(self, key_path: KeyPath, problem: str) -> ValueError:
        return ValueError(f"{self.where(key_path)}: {problem}")


def _dotted(key_path: KeyPath) -> str:
    text = ""
    for part in key_path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _node_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    """Record the line of every mapping key and list item under ``node``."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is None:
                continue
            path = (*prefix, key)
            lines.setdefault(path, key_node.start_mark.line + 1)
            _node_lines(value_node, path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            lines.setdefault(path, item.start_mark.line + 1)
            _node_lines(item, path, lines)


def _read_yaml(path: Path) -> tuple[Any, dict[KeyPath, int]]:
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"{path}: cannot be read: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = " ".join(str(getattr(error, "problem", "") or error).split())
        raise ValueError(f"{where}: not valid YAML: {problem}") from None
    lines: dict[KeyPath, int] = {}
    if root is not None:
        _node_lines(root, (), lines)
    return data, lines


def _check_keys(loc: _Located, mapping: dict[str, Any], valid: tuple[str, ...], prefix: KeyPath, what: str) -> None:
    for key in mapping:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise loc.error((*prefix, key), f"unknown key '{key}' in {what}{hint}; valid keys: {', '.join(valid)}")


def _mapping(loc: _Located, value: Any, key_path: KeyPath, allow_none: bool = True) -> dict[str, Any]:
    if value is None and allow_none:
        return {}
    if not isinstance(value, dict):
        raise loc.error(key_path, f"'{_dotted(key_path)}' must be a mapping, got {type(value).__name__} {value!r}")
    return value


def _string(loc: _Located, value: Any, key_path: KeyPath) -> str:
    if not isinstance(value, str):
        raise loc.error(key_path, f"'{_dotted(key_path)}' must be a string, got {type(value).__name__} {value!r}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _targets(loc: _Located, value: Any, key_path: KeyPath) -> tuple[float, ...]:
    if not isinstance(value, list) or not value or not all(_is_number(item) and item > 1 for item in value):
        raise loc.error(key_path, f"'{_dotted(key_path)}' must be a non-empty list of numbers > 1 (compression or "
                                  f"FLOPs-reduction factors), got {value!r}")
    if len(set(value)) != len(value):
        raise loc.error(key_path, f"'{_dotted(key_path)}' lists a target twice: {value!r}")
    return tuple(float(item) for item in value)


def _names(loc: _Located, value: Any, key_path: KeyPath, valid: dict[str, Any], what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise loc.error(key_path, f"'{_dotted(key_path)}' must be a non-empty list of {what} names, got {value!r}")
    for index, item in enumerate(value):
        if item not in valid:
            close = difflib.get_close_matches(item, list(valid), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise loc.error((*key_path, index), f"'{_dotted(key_path)}' names unknown {what} '{item}'{hint}; "
                                                f"the suite's {what}s: {', '.join(valid)}")
    return tuple(value)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base``: dicts recursively, lists and scalars replaced.

    Returns:
        A new dict; neither argument is changed.
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def substitute(value: Any, values: dict[str, Any], method: str) -> Any:
    """Replace ``${name}`` placeholders in every string of ``value`` (recursively).

    A string that is exactly one placeholder becomes its value (an int or float); inside a longer
    string the value is formatted with ``str()``. ``${width}`` stays as written (the entry resolves
    it at run time).

    Args:
        value: a config (dicts, lists, scalars).
        values: ``seed``, ``target``, ``sparsity``, ``density`` (the last three ``None`` for an
            untargeted entry).
        method: the method's name, for error messages.

    Returns:
        A new config with the placeholders replaced.

    Raises:
        ValueError: an unknown placeholder, or one of the target in an untargeted entry.
    """
    if isinstance(value, dict):
        return {key: substitute(item, values, method) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, values, method) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def lookup(name: str) -> Any:
        if name not in PLACEHOLDERS:
            raise ValueError(f"method '{method}': unknown placeholder '${{{name}}}'; valid placeholders: "
                             f"{', '.join('${' + item + '}' for item in PLACEHOLDERS)}")
        if name != "seed" and values.get("target") is None:
            raise ValueError(f"method '{method}' has no target (targets: null) but its config uses '${{{name}}}'")
        return "${width}" if name == "width" else values[name]

    whole = _PLACEHOLDER.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    return _PLACEHOLDER.sub(lambda match: str(lookup(match.group(1))), value)


def list_suites(directory: str | Path = DEFAULT_DIRECTORY) -> list[str]:
    """Names of the suite files (``*.yaml`` stems) in ``directory``, sorted; ``[]`` if it does not exist."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(path.stem for path in folder.glob("*.yaml") if path.is_file() and not path.name.startswith("."))


def resolve_suite_path(suite: str | Path, directory: str | Path = DEFAULT_DIRECTORY) -> Path:
    """The file of ``suite``: a path to a ``.yaml``/``.yml`` file, or a name in ``directory``.

    Raises:
        ValueError: the file does not exist; for a name, the message lists the available suites.
    """
    text = str(suite)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"suite file not found: {text}")
        return path
    path = Path(directory) / f"{text}.yaml"
    if not path.is_file():
        available = list_suites(directory)
        listing = ", ".join(available) if available else "none"
        close = difflib.get_close_matches(text, available, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown suite '{text}'{hint}; available suites in {directory}: {listing}")
    return path


def _parse_method(loc: _Located, name: str, value: Any, suite_targets: tuple[float, ...] | None,
                  models: dict[str, Any], datasets: dict[str, Any]) -> MethodSpec:
    prefix: KeyPath = ("methods", name)
    spec = _mapping(loc, value, prefix)
    _check_keys(loc, spec, METHOD_KEYS, prefix, f"method '{name}'")
    config = _mapping(loc, spec.get("config"), (*prefix, "config"))
    if "targets" in spec and spec["targets"] is None:
        targets: tuple[float | None, ...] = (None,)
    elif "targets" in spec:
        targets = _targets(loc, spec["targets"], (*prefix, "targets"))
    elif suite_targets is None:
        targets = (None,)  # no targets anywhere: one untargeted entry, as with targets: null
    else:
        targets = suite_targets
    baseline = spec.get("baseline")
    if baseline is not None and baseline not in BASELINES:
        close = difflib.get_close_matches(str(baseline), BASELINES, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise loc.error((*prefix, "baseline"), f"method '{name}': unknown baseline kind {baseline!r}{hint}; "
                                               f"valid kinds: {', '.join(BASELINES)}")
    only_models = _names(loc, spec["models"], (*prefix, "models"), models, "model") if "models" in spec else None
    only_data = _names(loc, spec["datasets"], (*prefix, "datasets"), datasets, "dataset") if "datasets" in spec else None
    description = _string(loc, spec.get("description", ""), (*prefix, "description"))
    return MethodSpec(name, config, targets, baseline, only_models, only_data, description)


def _parse_report(loc: _Located, value: Any) -> dict[str, Any]:
    report = _mapping(loc, value, ("report",))
    _check_keys(loc, report, REPORT_KEYS, ("report",), "the report section")
    if "metrics" in report and not (isinstance(report["metrics"], list) and all(isinstance(m, str) for m in report["metrics"])):
        raise loc.error(("report", "metrics"), f"'report.metrics' must be a list of metric names, got {report['metrics']!r}")
    if "plots" in report:
        plots = report["plots"]
        if not isinstance(plots, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(axis, str) for axis in pair) for pair in plots
        ):
            raise loc.error(("report", "plots"), f"'report.plots' must be a list of [x, y] metric-name pairs, got {plots!r}")
    if "title" in report:
        _string(loc, report["title"], ("report", "title"))
    return report


def _parse_wandb(loc: _Located, value: Any) -> dict[str, Any]:
    section = _mapping(loc, value, ("wandb",))
    _check_keys(loc, section, WANDB_KEYS, ("wandb",), "the wandb section")
    for key in ("project", "entity"):
        if key in section and section[key] is not None:
            _string(loc, section[key], ("wandb", key))
    if "tags" in section and not (isinstance(section["tags"], list) and all(isinstance(t, str) for t in section["tags"])):
        raise loc.error(("wandb", "tags"), f"'wandb.tags' must be a list of strings, got {section['tags']!r}")
    return section


def _named_sections(loc: _Located, data: dict[str, Any], key: str) -> dict[str, dict[str, Any]]:
    section = _mapping(loc, data[key], (key,), allow_none=False)
    if not section:
        raise loc.error((key,), f"'{key}' must name at least one entry")
    result = {}
    for name, value in section.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise loc.error((key, name), f"'{key}': name {name!r} must be letters, digits, '_', '-', '.' or '+' (it is part of labels)")
        result[name] = _choose_alternative(loc, _mapping(loc, value, (key, name)), (key, name))
    return result


def _choose_alternative(loc: _Located, section: dict[str, Any], prefix: KeyPath) -> dict[str, Any]:
    """A model or data set with ``alternatives``: the first whose ``requires`` paths all exist.

    ``alternatives`` is a list of ``{requires: [paths relative to the cwd], config: {...}}``; one
    without ``requires`` always applies. The chosen ``config`` is merged over the section's other keys.
    """
    if "alternatives" not in section:
        return section
    options = section["alternatives"]
    where = (*prefix, "alternatives")
    if not isinstance(options, list) or not options or not all(isinstance(option, dict) for option in options):
        raise loc.error(where, f"'{_dotted(where)}' must be a non-empty list of {{requires: [paths], config: {{...}}}}")
    missing: list[str] = []
    for index, option in enumerate(options):
        _check_keys(loc, option, ("requires", "config"), (*where, index), f"'{_dotted(where)}[{index}]'")
        requires = option.get("requires", [])
        if not isinstance(requires, list) or not all(isinstance(item, str) for item in requires):
            raise loc.error((*where, index, "requires"), f"'{_dotted((*where, index, 'requires'))}' must be a list of paths, got {requires!r}")
        config = _mapping(loc, option.get("config"), (*where, index, "config"))
        absent = [item for item in requires if not Path(item).exists()]
        if not absent:
            common = {key: value for key, value in section.items() if key != "alternatives"}
            return deep_merge(common, config)
        missing.extend(absent)
    raise loc.error(where, f"'{_dotted(prefix)}': no alternative applies (missing: {', '.join(missing)})")


def load_suite(suite: str | Path, directory: str | Path = DEFAULT_DIRECTORY, validate_configs: bool = True) -> Suite:
    """Read, validate and expand a suite.

    Args:
        suite: a suite name (``directory/<name>.yaml``) or a path to a ``.yaml`` file.
        directory: where suite names are looked up.
        validate_configs: also parse every entry's config with its command's parser (no classes
            are built; one parse per distinct config before placeholders). ``False`` is quicker
            (``--list``).

    Returns:
        The :class:`Suite` with its ``entries`` in grid order (model, data, method, target, seed).

    Raises:
        ValueError: one line: an unknown suite (lists the available ones), a key or value the
            suite format does not accept (``<file>:<line>:``, the key and the valid keys), two
            entries with the same key, missing baselines, or a command config its parser refuses.
    """
    path = resolve_suite_path(suite, directory)
    data, lines = _read_yaml(path)
    loc = _Located(path, lines)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a suite file must be a mapping of {', '.join(TOP_KEYS)}")
    _check_keys(loc, data, TOP_KEYS, (), "the suite")
    for key in ("name", *_REQUIRED):
        if key not in data:
            raise ValueError(f"{path}: required key '{key}' is missing")
    name = _string(loc, data["name"], ("name",))
    if name != path.stem:
        raise loc.error(("name",), f"name '{name}' must equal the file name's stem '{path.stem}'")
    description = _string(loc, data.get("description", ""), ("description",))
    command = data.get("command", "fit")
    if command not in COMMANDS:
        close = difflib.get_close_matches(str(command), COMMANDS, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise loc.error(("command",), f"unknown command {command!r}{hint}; valid commands: {', '.join(COMMANDS)}")
    base_name = data.get("base")
    base: dict[str, Any] = {}
    if base_name is not None:
        base_name = _string(loc, base_name, ("base",))
        base_path = Path(base_name)
        if not base_path.is_file():
            raise loc.error(("base",), f"base config file not found: {base_name} (paths are relative to the current directory)")
        base_data, _ = _read_yaml(base_path)
        if base_data is not None and not isinstance(base_data, dict):
            raise loc.error(("base",), f"base config {base_name} must be a mapping, got {type(base_data).__name__}")
        base = base_data or {}
    config = _mapping(loc, data.get("config"), ("config",))
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(_is_int(seed) and seed >= 0 for seed in seeds):
        raise loc.error(("seeds",), f"'seeds' must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise loc.error(("seeds",), f"'seeds' lists a seed twice: {seeds!r}")
    targets = _targets(loc, data["targets"], ("targets",)) if data.get("targets") is not None else None
    models = _named_sections(loc, data, "models")
    datasets = _named_sections(loc, data, "datasets")
    methods_section = _mapping(loc, data["methods"], ("methods",), allow_none=False)
    if not methods_section:
        raise loc.error(("methods",), "'methods' must name at least one method")
    methods: dict[str, MethodSpec] = {}
    for method_name, spec in methods_section.items():
        if not isinstance(method_name, str) or not _NAME.fullmatch(method_name):
            raise loc.error(("methods", method_name), f"method name {method_name!r} must be letters, digits, '_', '-', '.' or '+'")
        methods[method_name] = _parse_method(loc, method_name, spec, targets, models, datasets)
    require = data.get("require_baselines", command == "fit")
    if not isinstance(require, bool):
        raise loc.error(("require_baselines",), f"'require_baselines' must be true or false, got {require!r}")
    if require:
        if command != "fit":
            raise loc.error(("require_baselines",), f"'require_baselines' applies to command fit only (this suite runs {command})")
        present = {spec.baseline for spec in methods.values()}
        missing = [kind for kind in BASELINES if kind not in present]
        if missing:
            raise loc.error(("methods",), f"baseline kinds missing: {', '.join(missing)} (give methods 'baseline: <kind>', "
                                          "or set 'require_baselines: false')")
    report = _parse_report(loc, data.get("report"))
    wandb = _parse_wandb(loc, data.get("wandb"))

    entries, sources = _expand(loc, name, command, base, config, [int(s) for s in seeds], models, datasets, methods, wandb)
    result = Suite(name=name, path=path, description=description, command=command, base=base_name, config=config,
                   seeds=tuple(seeds), targets=targets or (), models=models, datasets=datasets, methods=methods,
                   require_baselines=require, report=report, wandb=wandb, entries=tuple(entries), lines=lines)
    if validate_configs:
        validate_entry_configs(result, sources)
    return result


def _expand(loc: _Located, suite: str, command: str, base: dict[str, Any], config: dict[str, Any], seeds: list[int],
            models: dict[str, dict[str, Any]], datasets: dict[str, dict[str, Any]], methods: dict[str, MethodSpec],
            wandb: dict[str, Any]) -> tuple[list[Entry], dict[str, tuple[str, str, str]]]:
    """The grid in (model, data, method, target, seed) order, and per entry key its (model, data, method)."""
    entries: list[Entry] = []
    sources: dict[str, tuple[str, str, str]] = {}
    labels: dict[str, str] = {}
    common = deep_merge(base, config)
    for model, model_config in models.items():
        for data, data_config in datasets.items():
            for method, spec in methods.items():
                if spec.models is not None and model not in spec.models:
                    continue
                if spec.datasets is not None and data not in spec.datasets:
                    continue
                merged = deep_merge(deep_merge(deep_merge(common, data_config), model_config), spec.config)
                for target in spec.targets:
                    for seed in seeds:
                        values = {"seed": seed, "target": target,
                                  "sparsity": None if target is None else 1.0 - 1.0 / target,
                                  "density": None if target is None else 1.0 / target}
                        try:
                            resolved = substitute(merged, values, method)
                        except ValueError as error:
                            raise loc.error(("methods", method), str(error)) from None
                        entry = Entry(suite, command, model, data, method, target, seed, spec.baseline,
                                      json.loads(json.dumps(resolved)), dict(wandb))
                        if entry.key in labels:
                            raise loc.error(("methods", method),
                                            f"entries {labels[entry.key]} and {entry.label} have the same resolved config "
                                            f"(key {entry.key}): use ${{seed}} / ${{target}} in the config, or drop one")
                        labels[entry.key] = entry.label
                        sources[entry.key] = (model, data, method)
                        entries.append(entry)
    return entries, sources


# --- command config validation ---------------------------------------------------------------------

_GROUP_OPTION = re.compile(r"Group '([\w.]+)' does not accept option '([\w.]+)'")
_QUOTED_KEY = re.compile(r"(?:option|key|Option|Key) '([\w.]+)'")
_PARSER_KEY = re.compile(r'Parser key "([\w.]+)"')


@lru_cache(maxsize=None)
def _command_parser(command: str) -> tuple[Any, tuple[str, ...]]:
    """(parser, option names) of ``command``; built once per process (the fit one takes ~1 s)."""
    if command == "fit":
        from growprune.cli import GrowPruneCLI

        class _ParserOnly(GrowPruneCLI):
            # builds LightningCLI's parser only: nothing parsed, seeded or instantiated
            def parse_arguments(self, parser: Any, args: Any) -> None:
                self.config = None

            def _parse_ckpt_path(self) -> None:
                pass

            def _set_seed(self) -> None:
                pass

            def instantiate_classes(self) -> None:
                pass

        parser = _ParserOnly(args=[], run=False).parser
    elif command == "evolve":
        from growprune.cli_evolve import build_parser

        parser = build_parser()
    elif command == "qd":
        from growprune.cli_qd import build_parser as build_qd_parser
        from growprune.qd.run import require_ribs

        require_ribs()
        parser = build_qd_parser()
    else:
        raise KeyError(command)
    return parser, tuple(action.dest for action in parser._actions)


def _config_error(message: str, options: tuple[str, ...], command: str) -> tuple[str, list[str]]:
    """(one-line problem, key segments to look for in the suite) of a parser error message."""
    from growprune.cli_errors import explain_parser_error

    if match := _GROUP_OPTION.search(message):
        option = f"{match.group(1)}.{match.group(2)}"
        close = difflib.get_close_matches(option, options, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown option '{option}'{hint}", option.split(".")
    line = explain_parser_error(message, {command: options})
    keys = _QUOTED_KEY.findall(line)
    if keys:
        return line, keys[-1].split(".")
    if match := _PARSER_KEY.search(message):
        return line, match.group(1).split(".")
    head = line.split(":", 1)[0]
    if " " not in head and "." in head:
        return line, head.split(".")
    return line, []


def _suite_line(suite: Suite, model: str, data: str, method: str, segments: list[str]) -> tuple[KeyPath, int] | None:
    """Where in the suite file the key ``segments`` (a suffix of a config key path) was written."""
    if not segments:
        return None
    # later sources win in the merge, so the key is most likely the method's
    prefixes: list[KeyPath] = [("methods", method, "config"), ("models", model), ("datasets", data), ("config",)]
    for prefix in prefixes:
        for path, line in suite.lines.items():
            if path[: len(prefix)] != prefix:
                continue
            names = [part for part in path[len(prefix):] if isinstance(part, str) and part not in ("init_args", "dict_kwargs")]
            if len(names) >= len(segments) and names[-len(segments):] == segments:
                return path, line
    return None


def validate_entry_configs(suite: Suite, sources: dict[str, tuple[str, str, str]] | None = None) -> None:
    """Check each entry's config with its command's own parser, without building any class.

    ``fit`` configs go through growprune fit's LightningCLI parser, ``evolve`` and ``qd`` through
    theirs (one parse per distinct (model, data, method): the placeholders of seed and target
    change values, not keys); ``latency`` configs through
    :func:`growprune.benchmark.latency.resolve_config` (every entry: it checks target-dependent
    values too, and costs microseconds).

    Raises:
        ValueError: the first config refused: ``<file>:<line>:`` of the key in the suite when it
            can be found (else the entry's label and the base file), and the problem in one line.
    """
    if suite.command == "latency":
        from growprune.benchmark.latency import resolve_config

        def check(entry: Entry) -> None:
            resolve_config(entry.config, entry.target)

        options: tuple[str, ...] = ()
        per_entry = True
    else:
        parser, options = _command_parser(suite.command)

        def check(entry: Entry) -> None:
            parser.parse_object(copy.deepcopy(entry.config))

        per_entry = False
    from jsonargparse import ArgumentError

    done: set[tuple[str, str, str]] = set()
    for entry in suite.entries:
        combination = (sources or {}).get(entry.key, (entry.model, entry.data, entry.method))
        if combination in done and not per_entry:
            continue
        done.add(combination)
        try:
            check(entry)
        except (ArgumentError, ValueError, TypeError, KeyError) as error:
            problem, segments = _config_error(str(error), options, suite.command)
            problem = problem.removeprefix(f"{suite.command} config: ")
            found = _suite_line(suite, entry.model, entry.data, entry.method, segments)
            if found is not None:
                raise ValueError(f"{suite.path}:{found[1]}: {suite.command} config of {entry.label}: {problem}") from None
            origin = f" (from base {suite.base})" if suite.base else ""
            raise ValueError(f"{suite.path}: {suite.command} config of {entry.label}{origin}: {problem}") from None


def grid_summary(suite: Suite) -> str:
    """``<n> entries: <models> x <datasets> x <methods>, seeds [..]`` for listings."""
    return (f"{len(suite.entries)} entries: {len(suite.models)} model(s) x {len(suite.datasets)} data set(s) x "
            f"{len(suite.methods)} method(s), seeds {list(suite.seeds)}")

