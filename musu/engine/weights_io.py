"""Reading weights files from users without running code from them.

Every weights file musu loads (``MODEL.WEIGHTS``, ``--resume``, ``musu://`` downloads, the tools)
goes through :func:`load_weights_file`:

* a PyTorch file (``.pth`` or any other name; zip or legacy format) is read with
  ``torch.load(..., weights_only=True)``: tensors, plain containers and numbers only, whatever
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says;
* a ``.pkl`` file (Detectron2's and Detectron1/Caffe2's model-zoo format, e.g.
  ``detectron2://ImageNetPretrained/MSRA/R-50.pkl``) is read with :class:`RestrictedUnpickler`:
  numpy arrays, dtypes and scalars, ``dict`` / ``OrderedDict`` / ``list`` / ``tuple``, strings,
  bytes, numbers, booleans and ``None``; a pickle naming any other global is refused before that
  global is even imported.

A file that fails is reported with :class:`WeightsFileError` (or its subclass
:class:`UnsafeWeightsError` for a refused global), whose message names the file and says what it
is (empty, text, an HTML page, a truncated archive, ...) or which global it asked for.
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
import re
import zipfile
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "RestrictedUnpickler",
    "UnsafeWeightsError",
    "WeightsFileError",
    "describe_file",
    "load_weights_file",
    "restricted_pickle_load",
]


class WeightsFileError(ValueError):
    """A file given as weights that is not a readable checkpoint; the message names the file."""


class UnsafeWeightsError(WeightsFileError, pickle.UnpicklingError):
    """A weights file whose unpickling needs a global outside the allowed set (it could run
    code); it was refused before that global was imported."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 only."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591", "l1"):
        raise UnsafeWeightsError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1", errors)


def _numpy_global(module: str, name: str) -> Callable[[], Any]:
    def resolve() -> Any:
        if module == "numpy":
            return getattr(np, name)
        # numpy 1.x writes numpy.core.*, numpy 2.x numpy._core.*: both name the same objects.
        submodule = module.split(".")[-1]
        core = getattr(np, "_core", None) or np.core
        return getattr(getattr(core, submodule), name)

    return resolve


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("numpy", "ndarray"): _numpy_global("numpy", "ndarray"),
    ("numpy", "dtype"): _numpy_global("numpy", "dtype"),
}
for _core in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _numpy_global(
        f"{_core}.multiarray", "_reconstruct"
    )
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _numpy_global(
        f"{_core}.multiarray", "scalar"
    )
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numpy_global(
        f"{_core}.numeric", "_frombuffer"
    )


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy arrays, dtypes, scalars and
    ``OrderedDict`` need; any other global (``os.system``, ``builtins.eval``, a class, ...)
    raises :class:`UnsafeWeightsError` naming it, before anything is imported or called.
    Persistent ids are refused too."""

    def find_class(self, module: str, name: str) -> Any:
        key = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module), name
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]()
        raise UnsafeWeightsError(f"global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError(f"persistent id {pid!r}")


def restricted_pickle_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``latin1`` for Python 2 pickles);
    the result holds nothing but allowed types (object arrays are refused)."""
    with open(path, "rb") as f:
        data = RestrictedUnpickler(f, encoding="latin1").load()
    _check_plain(data, "")
    return data


_PLAIN_LEAVES = (str, bytes, int, float, bool, type(None), np.generic, torch.Tensor)


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise UnsafeWeightsError(f"a numpy array of Python objects at {where or 'top level'}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, _PLAIN_LEAVES):
        raise UnsafeWeightsError(f"a {type(value).__name__} at {where or 'top level'}")


def describe_file(path: str | os.PathLike) -> str:
    """What ``path`` looks like, in a few words: its size and kind (empty, zip archive, pickle,
    HTML page, JSON, other text with its first line, or binary with its first bytes)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:
        return "an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(256)
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size} bytes"
    if head[:1] == b"\x80":
        return f"a pickle of {size} bytes (protocol {head[1]})"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:  # binary, or a character cut at the end of the head
        text = head[: error.start].decode("utf-8") if error.start >= len(head) - 3 else "\0"
    if not text or any(not (c.isprintable() or c in "\n\r\t") for c in text):
        return f"binary data of {size} bytes starting with {head[:8].hex(' ')}"
    stripped = text.lstrip()
    if stripped[:15].lower().startswith(("<!doctype html", "<html")):
        kind = "an HTML page (a web page saved instead of the file?)"
    elif stripped[:1] in ("{", "["):
        kind = "a JSON/text file"
    else:
        kind = "a text file"
    first_line = stripped.splitlines()[0][:60] if stripped else ""
    return f"{kind} of {size} bytes, starting {first_line!r}"


def _refused(path: str, what: str) -> UnsafeWeightsError:
    return UnsafeWeightsError(
        f"Refused to load weights file {path}: unpickling it needs {what}, which is not a "
        "tensor, array or plain container, so loading it could run code. Only weights "
        "(tensors, numpy arrays, numbers, strings, dicts, lists) are read from weights files; "
        "if you made this file yourself and trust it, save just its state dicts "
        "(torch.save({'model': model.state_dict()}, path))."
    )


def _unreadable(path: str, how: str, error: BaseException) -> WeightsFileError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return WeightsFileError(
        f"Weights file {path} is not a checkpoint that {how} can read: it is "
        f"{describe_file(path)} ({type(error).__name__}: {reason[:200]}). A PyTorch checkpoint "
        "(.pth, torch.save) or a Detectron2 model-zoo .pkl was expected; a truncated file "
        "(interrupted copy or download) looks like this too."
    )


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = str(error)
        if "weights only load failed" not in message.lower():
            raise _unreadable(path, "torch.load", error) from None
        wanted = re.search(r"GLOBAL\s+([\w.]+)", message)
        if wanted:
            raise _refused(path, f"global '{wanted.group(1)}'") from None
        # Not a refused global: the unpickler met data it cannot read (corrupt, not a pickle).
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1])
        raise _unreadable(path, "torch.load", pickle.UnpicklingError(detail)) from None
    except Exception as error:  # noqa: BLE001 - any other failure: not a readable checkpoint
        raise _unreadable(path, "torch.load", error) from None


def load_weights_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a local weights file without running code from it; return its top-level dict.

    ``.pkl`` files (unless they are in fact zip archives, i.e. ``torch.save`` output) go through
    :func:`restricted_pickle_load`, everything else through ``torch.load(weights_only=True)``.
    Raises :class:`UnsafeWeightsError` for a file that needs anything else, and
    :class:`WeightsFileError` for a missing, empty, truncated or non-checkpoint file or one
    whose content is not a dict; both name the file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsFileError(f"Weights file {path} does not exist (or is not a file)")
    if path.endswith(".pkl") and not zipfile.is_zipfile(path):
        try:
            data = restricted_pickle_load(path)
        except UnsafeWeightsError as error:
            raise _refused(path, str(error)) from None
        except Exception as error:  # noqa: BLE001 - truncated, not a pickle, ...
            raise _unreadable(path, "the .pkl reader", error) from None
    else:
        data = _torch_load(path)
    if not isinstance(data, dict):
        raise WeightsFileError(
            f"Weights file {path} holds a {type(data).__name__}, not a checkpoint dict "
            "({'model': state_dict, ...} or a state dict)"
        )
    return data
