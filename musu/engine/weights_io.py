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
from typing import Any

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


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol-2 pickles of an empty ``bytes`` use it: no arguments."""
    if args:
        raise UnsafeWeightsError("bytes() with arguments")
    return b""


# Numpy objects are rebuilt here, from validated pieces, never by numpy's own pickle helpers:
# those accept any dtype and buffer (an object dtype over attacker bytes gives an array of
# forged pointers, a structured dtype can read past its buffer). Only plain numeric dtypes
# (and fixed-size strings) are accepted, and every buffer's size is checked.
_PLAIN_KINDS = "biufcSU"  # bool, integers, floats, complex numbers, fixed-size strings


def _plain_dtype(value: Any) -> np.dtype:
    """``value`` (a dtype rebuilt by this module) if it is a plain numeric dtype."""
    if isinstance(value, _PendingDtype):
        value = value.result
    if not isinstance(value, np.dtype):
        raise UnsafeWeightsError(f"a numpy dtype given as {type(value).__name__}")
    if value.hasobject:
        raise UnsafeWeightsError(f"a numpy array of Python objects (dtype {value!r})")
    if value.kind not in _PLAIN_KINDS or value.names or value.subdtype:
        raise UnsafeWeightsError(f"numpy dtype {value!r}")
    return value


def _shape(value: Any) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    ):
        raise UnsafeWeightsError(f"numpy shape {value!r}")
    return value


def _array_from_bytes(data: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """A new array of ``shape`` and ``dtype`` holding exactly the bytes ``data``."""
    dtype, shape = _plain_dtype(dtype), _shape(shape)
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw().tobytes()
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeWeightsError(f"numpy array data given as {type(data).__name__}")
    if order not in ("C", "F") or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise UnsafeWeightsError(f"numpy array data of {len(data)} bytes for {shape} {dtype}")
    return np.frombuffer(bytes(data), dtype=dtype).reshape(shape, order=order).copy()


class _Pending:
    """What a numpy reconstructor returns; the BUILD that follows (its state) makes ``result``."""

    result: Any = None

    def build(self, state: Any) -> Any:
        raise NotImplementedError


class _PendingArray(_Pending):
    def build(self, state: Any) -> np.ndarray:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[3], bool)):
            raise UnsafeWeightsError(f"numpy array state of type {type(state).__name__}")
        _, shape, dtype, fortran, data = state
        self.result = _array_from_bytes(data, dtype, shape, "F" if fortran else "C")
        return self.result


class _PendingDtype(_Pending):
    def __init__(self, name: Any) -> None:
        if not isinstance(name, str):
            raise UnsafeWeightsError(f"numpy dtype named by a {type(name).__name__}")
        self.name = name

    def build(self, state: Any) -> np.dtype:
        # dtype.__reduce__ state: (version, byte order, subarray, names, fields, item size,
        # alignment, flags[, metadata]); a plain dtype has no subarray, names or fields.
        if not (isinstance(state, tuple) and len(state) in (8, 9)):
            raise UnsafeWeightsError("numpy dtype state")
        _, order, subarray, names, fields = state[:5]
        if subarray is not None or names is not None or fields is not None:
            raise UnsafeWeightsError("a structured or sub-array numpy dtype")
        if order not in ("<", ">", "|", "="):
            raise UnsafeWeightsError(f"numpy byte order {order!r}")
        try:
            dtype = np.dtype(self.name)
        except TypeError:
            raise UnsafeWeightsError(f"numpy dtype {self.name!r}") from None
        dtype = _plain_dtype(dtype)
        self.result = dtype.newbyteorder(order) if order in "<>" and dtype.itemsize > 1 else dtype
        return self.result


class _NDArrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: only ``_reconstruct`` may receive it."""

    def __call__(self, *args: Any) -> Any:
        raise UnsafeWeightsError("numpy.ndarray called directly")


_NDARRAY = _NDArrayToken()


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PendingArray:
    if subtype is not _NDARRAY:
        raise UnsafeWeightsError(f"numpy _reconstruct of {type(subtype).__name__}")
    return _PendingArray()


def _dtype(name: Any, align: Any = False, copy: Any = False) -> _PendingDtype:
    return _PendingDtype(name)


def _scalar(dtype: Any, data: Any = None) -> np.generic:
    return _array_from_bytes(data, dtype, (), "C")[()]


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _array_from_bytes(data, dtype, shape, order)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    _ALLOWED_GLOBALS[(f"{_core}.multiarray", "scalar")] = _scalar
    _ALLOWED_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _frombuffer


class RestrictedUnpickler(pickle._Unpickler):  # the Python unpickler: its BUILD can be replaced
    """An unpickler that resolves only the globals numpy arrays, dtypes, scalars and
    ``OrderedDict`` need, each to a stand-in of this module that checks its arguments; any other
    global (``os.system``, ``builtins.eval``, a class, ...) raises :class:`UnsafeWeightsError`
    naming it, before anything is imported or called. BUILD (``__setstate__``) applies only to
    the numpy stand-ins; persistent ids are refused."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        key = {"copy_reg": "copyreg", "__builtin__": "builtins"}.get(module, module), name
        if key in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[key]
        raise UnsafeWeightsError(f"global '{module}.{name}'")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeWeightsError(f"persistent id {pid!r}")

    def load_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _Pending):
            raise UnsafeWeightsError(f"setting the state of a {type(target).__name__}")
        self.stack[-1] = target.build(state)

    dispatch[pickle.BUILD[0]] = load_build


def _resolve(value: Any) -> Any:
    """``value`` with every numpy stand-in replaced by what its BUILD made (a stand-in also
    stays in the pickle's memo, so a second reference to an array finds the stand-in)."""
    if isinstance(value, _Pending):
        if value.result is None:
            raise UnsafeWeightsError("a numpy object without its state")
        return value.result
    if isinstance(value, dict):
        for key in list(value):
            value[key] = _resolve(value[key])
        return value
    if isinstance(value, list):
        value[:] = [_resolve(item) for item in value]
        return value
    if isinstance(value, tuple):
        return tuple(_resolve(item) for item in value)
    return value


def restricted_pickle_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (``latin1`` for Python 2 pickles);
    the result holds nothing but allowed types (arrays of plain numeric dtypes only)."""
    with open(path, "rb") as f:
        data = _resolve(RestrictedUnpickler(f, encoding="latin1").load())
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
