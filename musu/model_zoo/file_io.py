"""The ``musu://`` path handler: verified, cached downloads of published MuSu weights.

``musu://<name>`` resolves against the release location :data:`DEFAULT_MODEL_ZOO_URL`, or against
``$MUSU_MODEL_ZOO_URL`` when set (a mirror, a local folder or ``file://`` URL on an air-gapped
site, a test server), read each time a path is resolved. ``<name>`` is either a model-zoo config
name (``Synthetic/musu_R_18_FPN_synthetic``, ``.yaml`` optional) or a published file path
relative to the release location (``<config name>/model_final_<sha256 prefix>.pth``, or
``.pkl`` for Detectron2's model-zoo format).

Every file is checked before it is used: its SHA-256 must equal the model zoo table's hash (or,
for a file outside the table, start with the hex prefix in its name), and it must load without
running code (:func:`musu.engine.weights_io.load_weights_file`: tensor-only ``torch.load`` for
``.pth``, a numpy-only unpickler for ``.pkl``) as ``{"model": {str: Tensor or ndarray},
"__author__"?: str, "matching_heuristics"?: bool}``. A download that fails the hash check is deleted and refused with
:class:`ChecksumMismatchError`; a cached file that fails it is deleted and downloaded once more.

Cache folder (see :func:`cache_dir`): ``$MUSU_CACHE_DIR/model_zoo`` if ``MUSU_CACHE_DIR`` is set;
else ``$FVCORE_CACHE/musu/model_zoo`` if ``FVCORE_CACHE`` is set (the variable Detectron2's own
``detectron2://`` downloads honour, through iopath); else ``~/.cache/musu/model_zoo``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Mapping

import numpy as np
import torch
from iopath.common.file_io import PathHandler, file_lock

from ..engine.checkpoint import atomic_write
from ..engine.weights_io import WeightsFileError, load_weights_file
from .table import MODEL_ZOO_FILES, configs_root

__all__ = [
    "ALLOWED_CHECKPOINT_KEYS",
    "DEFAULT_MODEL_ZOO_URL",
    "ENV_CACHE_DIR",
    "ENV_MODEL_ZOO_URL",
    "HASH_PREFIX_LENGTH",
    "PREFIX",
    "ChecksumMismatchError",
    "ModelZooError",
    "MuSuModelZooHandler",
    "ResolvedFile",
    "cache_dir",
    "fetch",
    "load_checkpoint",
    "model_zoo_url",
    "resolve",
    "sha256_of",
    "validate_checkpoint",
]

logger = logging.getLogger(__name__)

PREFIX = "musu://"
DEFAULT_MODEL_ZOO_URL = "https://huggingface.co/musu-detection/model-zoo/resolve/main/"
"""The release location: published files live at ``<this>/<config name>/model_final_<h>.pth``."""
ENV_MODEL_ZOO_URL = "MUSU_MODEL_ZOO_URL"
ENV_CACHE_DIR = "MUSU_CACHE_DIR"
HASH_PREFIX_LENGTH = 12
"""Hex characters of the SHA-256 in a published file's name (``model_final_<12 hex>.pth``)."""
_MIN_PREFIX_LENGTH = 8
ALLOWED_CHECKPOINT_KEYS = frozenset({"model", "__author__", "matching_heuristics"})
_HASHED_NAME = re.compile(r"^.+_([0-9a-f]{%d,64})\.(?:pth|pkl)$" % _MIN_PREFIX_LENGTH)
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


class ModelZooError(RuntimeError):
    """A ``musu://`` name that cannot be resolved, downloaded or used."""


class ChecksumMismatchError(ModelZooError):
    """A file whose SHA-256 is not the published one (tampered, truncated or corrupt)."""


@dataclass(frozen=True)
class ResolvedFile:
    """A published file: path relative to the release location and its expected SHA-256 (the
    full digest from the model zoo table, or only the hex prefix from the file name)."""

    relpath: str
    sha256: str

    @property
    def filename(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]


def model_zoo_url() -> str:
    """Base URL now: ``$MUSU_MODEL_ZOO_URL`` (a URL, or a local folder) if set and non-empty,
    else :data:`DEFAULT_MODEL_ZOO_URL`; always ends with ``/``."""
    base = os.environ.get(ENV_MODEL_ZOO_URL) or DEFAULT_MODEL_ZOO_URL
    if "://" not in base:  # a plain folder: a mirror on a shared file system
        base = Path(base).expanduser().resolve().as_uri()
    return base if base.endswith("/") else base + "/"


def cache_dir() -> Path:
    """Download cache now (see the module docstring for the order of the variables)."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser() / "model_zoo"
    if os.environ.get("FVCORE_CACHE"):
        return Path(os.environ["FVCORE_CACHE"]).expanduser() / "musu" / "model_zoo"
    return Path.home() / ".cache" / "musu" / "model_zoo"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve(name: str) -> ResolvedFile:
    """The published file a ``musu://`` name (prefix optional) stands for.

    Raises :class:`ModelZooError` for a name that is neither in the model zoo table nor a file
    name carrying a hash (``..._<8 to 64 hex>.pth``), which could not be verified.
    """
    name = name[len(PREFIX) :] if name.startswith(PREFIX) else name
    name = name.strip("/")
    key = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if key in MODEL_ZOO_FILES:
        entry = MODEL_ZOO_FILES[key]
        return ResolvedFile(entry.file, entry.sha256)
    for entry in MODEL_ZOO_FILES.values():
        if entry.file == name:
            return ResolvedFile(entry.file, entry.sha256)
    parts = name.split("/")
    match = _HASHED_NAME.match(parts[-1])
    if match and all(part not in ("", ".", "..") for part in parts):
        return ResolvedFile(name, match.group(1))
    known = ", ".join(sorted(MODEL_ZOO_FILES)) or "<none>"
    if (configs_root() / f"{key}.yaml").is_file():
        raise ModelZooError(
            f"No weights are published for config {key}.yaml yet ({PREFIX}{name}); published: "
            f"{known}. See MODEL_ZOO.md."
        )
    raise ModelZooError(
        f"Unknown MuSu model zoo name {PREFIX}{name}: it is not a published config name (known: "
        f"{known}) nor a file name with a hash to verify (<name>/model_final_<sha256 prefix>.pth)."
    )


def _mirror_hint() -> str:
    source = (
        f"{ENV_MODEL_ZOO_URL}={os.environ[ENV_MODEL_ZOO_URL]!r}"
        if os.environ.get(ENV_MODEL_ZOO_URL)
        else f"the default release location ({ENV_MODEL_ZOO_URL} is not set)"
    )
    return (
        f"Base URL from {source}. To use a mirror, set {ENV_MODEL_ZOO_URL} to its URL or to a "
        f"local folder holding <config name>/<file> (e.g. export {ENV_MODEL_ZOO_URL}="
        "/shared/musu-model-zoo), or put the file into the cache folder "
        f"{cache_dir()} under the same relative path."
    )


def _check_hash(path: Path, expected: str, actual: str, url: str, note: str = "") -> None:
    if not actual.startswith(expected):
        raise ChecksumMismatchError(
            f"MuSu model zoo file {path.name} failed its integrity check: expected SHA-256 "
            f"{expected}{'' if len(expected) == 64 else '...'}, actual {actual} (downloaded from "
            f"{url}{note}). The file was deleted and not loaded; check {ENV_MODEL_ZOO_URL} or "
            "the mirror serving it."
        )


def _download(url: str, dest: IO[bytes]) -> tuple[str, str]:
    """Download ``url`` into the open file ``dest``; return the content's SHA-256 and a note on
    its size when it differs from the declared Content-Length (a truncated transfer)."""
    request = urllib.request.Request(url, headers={"User-Agent": "musu-model-zoo"})
    digest, size = hashlib.sha256(), 0
    logger.info("Downloading %s ...", url)
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length")
            while chunk := response.read(_CHUNK):
                dest.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as error:
        raise ModelZooError(
            f"Could not download {url}: HTTP {error.code} {error.reason}. Is the file published "
            f"there? {_mirror_hint()}"
        ) from error
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise ModelZooError(f"Could not download {url}: {error!r}. {_mirror_hint()}") from error
    note = ""
    if declared is not None and declared.isdigit() and int(declared) != size:
        note = f"; received {size} of {declared} bytes"
    return digest.hexdigest(), note


def fetch(name: str, force: bool = False) -> str:
    """Local path of the verified file ``name`` stands for, downloaded into :func:`cache_dir`
    unless a cached copy passes the hash check (``force``: download anyway).

    A corrupt cached copy is deleted and downloaded once more; a download whose hash is wrong is
    deleted and raises :class:`ChecksumMismatchError`. The returned file also passed
    :func:`validate_checkpoint` (tensor-only content).
    """
    resolved = resolve(name)
    url = model_zoo_url() + urllib.parse.quote(resolved.relpath)
    cached = cache_dir() / resolved.relpath
    cached.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(str(cached)):
        if cached.is_file() and not force:
            actual = sha256_of(cached)
            if actual.startswith(resolved.sha256):
                logger.info("%s%s: using cached %s", PREFIX, resolved.relpath, cached)
                validate_checkpoint(cached)
                return str(cached)
            logger.warning(
                "Cached %s is corrupt (SHA-256 %s, expected %s): downloading it again.",
                cached,
                actual,
                resolved.sha256,
            )
            cached.unlink()
        with atomic_write(cached, "wb") as f:  # a wrong hash raises: nothing is published
            actual, note = _download(url, f)
            _check_hash(cached, resolved.sha256, actual, url, note)
    logger.info("%s cached in %s", url, cached)
    validate_checkpoint(cached)
    return str(cached)


def validate_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """Load (without running code: :func:`musu.engine.weights_io.load_weights_file`) and check a
    published checkpoint.

    Returns the dict; raises :class:`ModelZooError` if the file needs more than tensors, numpy
    arrays and plain containers, or its content is not ``{"model": {str: Tensor or ndarray},
    "__author__"?: str, "matching_heuristics"?: bool}``.
    """
    source = "<dict>"
    if not isinstance(checkpoint, Mapping):
        source = os.fspath(checkpoint)
        try:
            checkpoint = load_weights_file(source)
        except WeightsFileError as error:
            raise ModelZooError(f"{source} is not a tensor-only checkpoint: {error}") from error
    problem = None
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        problem = "it is not a dict with a 'model' entry"
    elif set(checkpoint) - ALLOWED_CHECKPOINT_KEYS:
        problem = f"unexpected entries {sorted(set(checkpoint) - ALLOWED_CHECKPOINT_KEYS)}"
    elif not isinstance(checkpoint["model"], Mapping) or not all(
        isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray))
        for k, v in checkpoint["model"].items()
    ):
        problem = "'model' is not a {name: Tensor} state dict"
    elif not isinstance(checkpoint.get("__author__", ""), str) or not isinstance(
        checkpoint.get("matching_heuristics", False), bool
    ):
        problem = "'__author__' must be a str and 'matching_heuristics' a bool"
    if problem:
        raise ModelZooError(f"{source} is not a published MuSu checkpoint: {problem}.")
    return dict(checkpoint)


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load ``path`` (a local file or any PathManager path, e.g. ``musu://``) weights-only."""
    from detectron2.utils.file_io import PathManager

    return validate_checkpoint(PathManager.get_local_path(path))


class MuSuModelZooHandler(PathHandler):
    """iopath handler of ``musu://`` paths; registered on Detectron2's ``PathManager`` by
    ``import musu``. ``get_local_path`` returns a verified, cached copy (see :func:`fetch`)."""

    PREFIX = PREFIX

    def _get_supported_prefixes(self) -> list[str]:
        return [self.PREFIX]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        self._check_kwargs(kwargs)
        return fetch(path, force=force)

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any) -> IO[Any]:
        self._check_kwargs(kwargs)
        if mode not in ("r", "rb"):
            raise ValueError(f"{path}: musu:// paths are read-only, not mode {mode!r}")
        return open(fetch(path), mode, buffering)

    def _exists(self, path: str, **kwargs: Any) -> bool:
        self._check_kwargs(kwargs)
        try:
            resolve(path)
        except ModelZooError:
            return False
        return True

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        return self._exists(path, **kwargs)
