"""One-line messages for bad command-line input.

jsonargparse reports a bad value deep inside a config as a nested dump: ``Parser key "..."`` and
``Problem with given class_path '...'`` headers, and for every ``Union`` type (a callback list, a
data module, a logger) the error of *each* subtype it tried, most of them irrelevant ("Expected a
<class 'NoneType'>"). :func:`explain_parser_error` walks that text down to the root cause of the
subtype the user meant and prints the path to it, e.g.

    trainer.callbacks > growprune.strategies.UnstructuredPruning > schedule > growprune.schedules.OneShot: option 'amout' is not accepted (did you mean 'amount'?)

:func:`explain_instantiation_error` does the same for errors raised while the classes are built
(a value the class itself refuses), locating the class in the parsed config.
:func:`check_checkpoint` refuses a ``--ckpt_path`` that Lightning could not load, before anything
that writes files (run directory, W&B run) is created.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import pickle
import re
import textwrap
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from growprune.errors import ConfigurationError

_PARSER_KEY = re.compile(r'Parser key "([^"]+)":(.*)', re.S)
_CLASS_PATH_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':(.*)", re.S)
_CALLABLE_TYPE = re.compile(r"Type .+? expects a function or a callable class: (.*)", re.S)
_UNION = "Does not validate against any of the Union subtypes"
_UNKNOWN_OPTION = re.compile(r"Subcommand '([^']+)' does not accept option '([^']+)'")
_UNRECOGNIZED = re.compile(r"[Uu]nrecognized arguments: (.*)", re.S)
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
# jsonargparse's type mismatch: "Expected a <class 'int'>", "Expected a typing.Literal['a', 'b']"
_EXPECTED_TYPE = re.compile(r"Expected an? (<class '[\w.]+'>|[\w.]+\[[^\n]*\])(?:\. Got value: (.*))?$", re.S)
_NOT_SUBCLASS = re.compile(r"Not a valid subclass of (\w+)")
_CLASS_PATH_IN_VALUE = re.compile(r"""class_path(?:=|': )'([^']+)'""")
_GOT_VALUE = re.compile(r"\. Got value: .*$", re.S)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip())


def error_line(error: BaseException) -> str:
    """The error's text on one line for ``growprune: error: ...`` (never empty: the exception type
    when it has no text)."""
    return _one_line(str(error)) or type(error).__name__


def _type_name(name: str) -> str:
    """``<class 'int'>`` -> int, ``typing.Literal['a', 'b']`` -> one of 'a', 'b', ``NoneType`` -> None."""
    name = name.strip()
    if match := re.fullmatch(r"<class '([\w.]+)'>", name):
        name = match.group(1)
    if match := re.fullmatch(r"(?:typing\.)?Literal\[(.*)\]", name, re.S):
        return f"one of {match.group(1)}"
    short = name.rsplit(".", 1)[-1] if re.fullmatch(r"[\w.]+", name) else name
    return "None" if short == "NoneType" else short


def _shorten(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _parameters(class_path: str) -> list[str]:
    target = _import(class_path)
    if target is None:
        return []
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [name for name, parameter in signature.parameters.items() if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]


def _split_union(text: str) -> tuple[list[str], str, list[str]]:
    """The subtype errors of a Union dump, the given value, and the subtype names."""
    lines = text.splitlines()
    items: list[list[str]] = []
    given = ""
    subtypes = re.findall(r"(<class '[\w.]+'>)|([\w.]+\[[^\]]*\])", next((line for line in lines if line.startswith("Subtypes:")), ""))
    in_errors = False
    for line in lines:
        if line.startswith("Errors:"):
            in_errors = True
        elif line.startswith("Given value: "):
            given = line.removeprefix("Given value: ")
        elif not line.startswith(" "):
            in_errors = False
        elif in_errors and line.startswith("  - "):
            items.append([line[4:]])
        elif in_errors and items:
            # jsonargparse indents a subtype's further lines by 4 (2 for the list, 2 for the item)
            items[-1].append(line[4:] if line.startswith("    ") else line.strip())
    names = [_type_name(plain or generic) for plain, generic in subtypes]
    return ["\n".join(item) for item in items], given, names


def _is_generic(item: str) -> bool:
    """A subtype's plain type mismatch: the user meant another subtype."""
    return bool(_EXPECTED_TYPE.fullmatch(item.strip()) or _NOT_SUBCLASS.match(item.strip()))


def _walk_union(text: str) -> tuple[list[str], str]:
    items, given, subtypes = _split_union(text)
    meant = [item for item in items if not _is_generic(item)]
    if not meant:
        expected: list[str] = []
        for item in items:
            if match := _EXPECTED_TYPE.fullmatch(item.strip()):
                expected.append(_type_name(match.group(1)))
            elif match := _NOT_SUBCLASS.match(item.strip()):
                expected.append(f"a {match.group(1)} class_path")
        expected = expected or subtypes
        # several Literal subtypes (e.g. trainer.precision) read as one list of values
        values = [name.removeprefix("one of ") for name in expected if name.startswith("one of ")]
        kinds = [name for name in expected if not name.startswith("one of ")]
        expected = ([f"one of {', '.join(values)}"] if values else []) + kinds
        return [], f"expected {' or '.join(expected) or 'another type'}, got {_shorten(given)!r}"
    # several candidates: the one about the class the user gave
    given_classes = _CLASS_PATH_IN_VALUE.findall(given)
    chosen = next((item for item in meant for class_path in given_classes if f"'{class_path}'" in item), meant[0])
    return _walk(chosen)


def _leaf(text: str, path: list[str]) -> str:
    text = text.strip()
    if match := _EXPECTED_TYPE.fullmatch(text):
        got = f", got {_shorten(match.group(2).strip())!r}" if match.group(2) is not None else ""
        return f"expected {_type_name(match.group(1))}{got}"
    if match := _NOT_ACCEPTED.match(text):
        owner = next((segment for segment in reversed(path) if "." in segment), "")
        return f"option '{match.group(1)}' is not accepted{_did_you_mean(match.group(1), _parameters(owner))}"
    line = _one_line(text)
    return line[0].lower() + line[1:] if line.startswith(("Option ", "Expected ")) else line


def _walk(text: str) -> tuple[list[str], str]:
    """(path to the error: keys and class paths, root message) of one jsonargparse error text."""
    text = textwrap.dedent(text).strip()
    if match := _PARSER_KEY.match(text):
        path, leaf = _walk(match.group(2))
        return [match.group(1), *path], leaf
    if match := _CLASS_PATH_PROBLEM.match(text):
        path, leaf = _walk(match.group(2))
        return [match.group(1), *path], leaf
    if match := _CALLABLE_TYPE.match(text):
        rest = match.group(1)
        class_path = _CLASS_PATH_IN_VALUE.search(rest)
        path, leaf = _walk(_GOT_VALUE.sub("", rest))
        return ([class_path.group(1)] if class_path else []) + path, leaf
    if text.startswith(_UNION):
        return _walk_union(text)
    return [], text


def explain_parser_error(message: str, options: Mapping[str, Iterable[str]] | None = None) -> str:
    """One line for a jsonargparse error message: the path to the problem and its root cause.

    Args:
        message: the text of jsonargparse's ``ArgumentError`` or of the error raised while
            instantiating classes.
        options: per subcommand, the option names it accepts (to suggest one for a typo).
    """
    message = _ANSI.sub("", message or "").strip()
    if match := _UNKNOWN_OPTION.search(message):
        subcommand, option = match.groups()
        return f"unknown option '{option}'{_did_you_mean(option, (options or {}).get(subcommand, ()))}"
    if match := _UNRECOGNIZED.match(message):
        # argparse's form (command-line options); it does not say which subcommand parsed them
        known = sorted({name for names in (options or {}).values() for name in names})
        unknown = [token for token in match.group(1).split() if token.startswith("-")]
        if unknown:
            return "; ".join(
                f"unknown option '{token.split('=', 1)[0].lstrip('-')}'{_did_you_mean(token.split('=', 1)[0].lstrip('-'), known)}"
                for token in unknown
            )
    try:
        path, leaf = _walk(message)
        leaf = _leaf(leaf, path)
    except Exception:  # a format this reader does not know: never hide the message behind a crash
        path, leaf = [], ""
    if not leaf:
        path, leaf = [], _one_line(message) or "invalid configuration"
    return " > ".join(path) + (": " if path else "") + leaf


def _class_paths(node: Any, key: str = "") -> Iterable[tuple[str, str]]:
    """(config key, class_path) of every class in a parsed config, ``init_args`` left out of keys."""
    if isinstance(node, (Mapping, Namespace)):
        items = list(node.items() if isinstance(node, Mapping) else vars(node).items())
        for name, value in items:
            if name == "class_path" and isinstance(value, str):
                yield key, value
        for name, value in items:
            if name in ("class_path", "__path__") or name.startswith("_"):
                continue
            child = key if name in ("init_args", "dict_kwargs") else (f"{key}.{name}" if key else name)
            yield from _class_paths(value, child)
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _class_paths(value, f"{key}[{index}]")


def _raising_class(error: BaseException) -> type | None:
    """The class whose ``__init__`` raised ``error`` (the outermost such frame: the class built)."""
    for frame, _ in traceback.walk_tb(error.__traceback__):
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            module = frame.f_globals.get("__name__", "")
            if not module.startswith(("jsonargparse", "lightning.pytorch.cli", "argparse")):
                return type(frame.f_locals["self"])
    return None


def explain_instantiation_error(error: BaseException, config: Any = None) -> str:
    """One line for an error raised while the command line builds its classes.

    The message is reduced as for parser errors; the class that refused its arguments is found in
    the traceback and located in ``config`` (the parsed config of the subcommand), so the line
    names the config key and the class path as the user wrote them.
    """
    message = str(error)
    explained = explain_parser_error(message)
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    cls = _raising_class(root) if _one_line(str(root)) and _one_line(str(root)) in explained else None
    candidates = list(_class_paths(config)) if config is not None else []
    if cls is not None:
        located = [(key, class_path) for key, class_path in candidates if class_path.rsplit(".", 1)[-1] == cls.__name__]
    else:
        # the class the user gave for a single-class value (a list names several: no guess)
        given = message.rsplit("\nGiven value: ", 1)[-1] if "\nGiven value: " in message else ""
        top = _CLASS_PATH_IN_VALUE.match(given.removeprefix("Namespace(").removeprefix("{'").removeprefix("{"))
        located = [(key, class_path) for key, class_path in candidates if top and class_path == top.group(1)]
    if len(located) == 1 and " > " not in explained:
        key, class_path = located[0]
        return f"{key} > {class_path}: {explained}" if key else f"{class_path}: {explained}"
    return explained


# Values of ``ckpt_path`` that Lightning resolves itself (no file behind them yet).
_CHECKPOINT_NAMES = ("last", "best", "hpc", "registry")
_ZIP_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # torch.save's older format: a pickle (protocol 2 or later)


def _refused_objects(error: BaseException) -> str | None:
    """What a weights-only load refused (a global that is not allowed), if that is the error."""
    detail = re.search(r"WeightsUnpickler error: ([^\n]+)", _ANSI.sub("", str(error)))
    if isinstance(error, pickle.UnpicklingError) and detail:
        return detail.group(1).strip().split(". ")[0]
    return None


def _load_reason(error: BaseException) -> str:
    text = _ANSI.sub("", str(error)).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def check_checkpoint(path: str, directories_allowed: bool = False) -> None:
    """Refuse a checkpoint that Lightning could not resume from, with one line naming the file.

    Checks that ``path`` exists, is a non-empty file, loads with
    ``torch.load(weights_only=True, map_location="cpu")`` (memory-mapped, so the tensors are not
    read) and holds a ``state_dict``. Names Lightning resolves itself (``last``, ``best``, ``hpc``,
    ``registry...``) and remote URLs pass unchecked; a directory passes when
    ``directories_allowed`` (sharded checkpoints of FSDP or DeepSpeed are directories).

    Raises:
        ConfigurationError: the checkpoint is missing, empty, unreadable or not Lightning's.
    """
    if path in _CHECKPOINT_NAMES or path.startswith("registry:") or "://" in path:
        return
    file = Path(path).expanduser()
    if not file.exists():
        raise ConfigurationError(f"checkpoint not found: {path}")
    if file.is_dir():
        if directories_allowed:
            return
        raise ConfigurationError(f"checkpoint {path} is a directory, not a checkpoint file")
    if file.stat().st_size == 0:
        raise ConfigurationError(f"checkpoint {path} is empty (0 bytes)")
    with file.open("rb") as handle:
        head = handle.read(8)
    is_zip = head.startswith(_ZIP_SIGNATURE)  # torch.save's format since torch 1.6
    try:
        # mmap: only the pickled structure is read, not the tensors (Lightning loads the file again);
        # files of the older format cannot be mapped
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as error:
        if refused := _refused_objects(error):
            reason = f": it holds Python objects that torch.load(weights_only=True) refuses ({refused})"
        elif is_zip:
            reason = f" (truncated or corrupted): {_load_reason(error)}"
        elif head.startswith(_PICKLE_PROTOCOL):
            reason = f": {_load_reason(error)}"
        else:
            reason = f": not a PyTorch checkpoint file (it starts with {head!r})"
        raise ConfigurationError(f"checkpoint {path} cannot be loaded{reason}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = ", ".join(map(str, list(checkpoint)[:6])) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigurationError(f"checkpoint {path} is not a Lightning checkpoint: it has no 'state_dict' entry (found: {keys})")
