"""Crash-safe checkpointing: a checkpoint file either holds a complete checkpoint or is absent.

fvcore's ``Checkpointer.save`` streams ``torch.save`` straight into ``model_XXXXXXX.pth`` and then
overwrites ``last_checkpoint`` in place, so a process killed mid-write leaves a truncated file that
``--resume`` then tries to load. :class:`AtomicCheckpointer` writes each file to a temporary file in
the same folder, flushes and fsyncs it, renames it over the target with ``os.replace`` (atomic on
POSIX and Windows) and fsyncs the folder. ``last_checkpoint`` is only re-tagged after its
checkpoint is in place, so it always names a complete file.

Loading reads every file through :func:`musu.engine.weights_io.load_weights_file` (tensor-only
``torch.load`` for ``.pth``, a restricted unpickler for Detectron2's model-zoo ``.pkl``): no
weights file can run code. ``--resume`` (``resume_or_load(..., resume=True)``) continues from the
newest checkpoint in the folder that loads when ``last_checkpoint`` is absent or names a file that
is gone or unreadable; see :meth:`AtomicCheckpointer.resume_or_load`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from .weights_io import WeightsFileError, load_weights_file

__all__ = ["AtomicCheckpointer", "atomic_write", "NoResumableCheckpointError", "TMP_SUFFIX"]

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".partial"
"""Suffix of the temporary files (``.<target name>.<random>.partial``) being written."""
UNREADABLE_SUFFIX = ".unreadable"
"""Suffix a checkpoint that failed to load gets when ``--resume`` continues from an older one."""
_RESUMABLE = re.compile(r"^model_(\d+|final)\.pth$")


class NoResumableCheckpointError(RuntimeError):
    """``--resume`` found checkpoints in the output folder, but none of them loads."""


def _fsync_dir(directory: str) -> None:
    """Persist a rename in ``directory`` (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit publish it as ``path``.

    The content is flushed and fsynced before ``os.replace``; on any exception (or a kill) the
    target keeps its previous content and the temporary file is removed (a kill leaves it behind
    under a ``.``-prefixed ``*.partial`` name that no loader looks at).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX, dir=directory
    )
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic ``save`` and ``tag_last_checkpoint``.

    Same file layout and content as Detectron2's (``{"model": ..., <checkpointables>...,
    <extra data>}``), so its checkpoints load with any Detectron2 checkpointer. Folders that are
    not local paths (``scheme://``) fall back to the parent's non-atomic writes. On the main
    process, construction removes temporary files left behind by a writer that was killed.

    Every file is read without running code from it (:mod:`musu.engine.weights_io`); a file that
    is not a checkpoint raises :class:`~musu.engine.weights_io.WeightsFileError` naming it.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        require_weights: str = "some",
        **kwargs: Any,
    ) -> None:
        if require_weights not in ("some", "all"):
            raise ValueError(f"require_weights must be 'some' or 'all', got {require_weights!r}")
        super().__init__(model, save_dir, **kwargs)
        self.require_weights = require_weights
        self._incompatible: Any = None
        self._preloaded: tuple[str, dict[str, Any]] | None = None
        if self._is_local() and self.save_to_disk:
            for stale in Path(self.save_dir).glob(f".*{TMP_SUFFIX}"):
                logger.warning("Removing %s, left by an interrupted checkpoint write", stale)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    # ----------------------------------------------------------------------------------------
    # Reading files: nothing but weights, and an error naming the file otherwise.
    # ----------------------------------------------------------------------------------------

    def _load_file(self, filename: str) -> dict[str, Any]:
        """The checkpoint dict of the local file ``filename`` (``{"model": ..., ...}``).

        ``.pkl``: Detectron2 model-zoo format (``"model"`` and ``"__author__"``) as it is; any
        other pickled dict is Detectron1 / Caffe2 blobs (``"blobs"`` or top level, without
        ``*_momentum``), loaded by name-matching heuristics. ``.pyth``: pycls ``model_state``.
        Anything else: a ``torch.save`` file, through Detectron2's handling (``?matching_heuristics
        =True`` in the path).
        """
        if self._preloaded is not None and self._preloaded[0] == filename:
            checkpoint = self._preloaded[1]
        elif filename.endswith(".pkl"):
            checkpoint = _model_zoo_pickle(load_weights_file(filename), self.logger)
        elif filename.endswith(".pyth"):
            data = load_weights_file(filename)
            if not isinstance(data.get("model_state"), dict):
                raise WeightsFileError(
                    f"Weights file {filename} has no 'model_state' dict: a .pyth file is read "
                    f"as a pycls checkpoint (entries: {sorted(map(str, data))[:10]})"
                )
            state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            checkpoint = {"model": state, "__author__": "pycls", "matching_heuristics": True}
        else:
            checkpoint = super()._load_file(filename)  # calls self._torch_load
        _check_state_dict(filename, checkpoint)
        return checkpoint

    def _torch_load(self, f: str) -> dict[str, Any]:
        return load_weights_file(f)

    def _read_checkpoint(self, filename: str) -> dict[str, Any]:
        """:meth:`_load_file` of a local file outside :meth:`load` (no query string)."""
        if filename.endswith((".pkl", ".pyth")):
            return self._load_file(filename)
        checkpoint = load_weights_file(filename)
        checkpoint = checkpoint if "model" in checkpoint else {"model": checkpoint}
        _check_state_dict(filename, checkpoint)
        return checkpoint

    def _load_model(self, checkpoint: Any) -> Any:
        self._incompatible = super()._load_model(checkpoint)
        return self._incompatible

    def load(self, path: str, checkpointables: Any = None) -> dict[str, Any]:
        """fvcore's ``load`` (``FileNotFoundError`` naming a missing local file), then a check of
        how much of the model the file filled:
        ``ValueError`` naming the file if none of the model's parameters were loaded
        (weights of another architecture), or, with ``require_weights="all"`` (evaluation), if
        any was missing or had another shape (e.g. another number of classes)."""
        self._incompatible = None
        if path and "://" not in path and not os.path.isfile(path.split("?", 1)[0]):
            raise FileNotFoundError(f"Weights file {path} not found (check MODEL.WEIGHTS)")
        extra = super().load(path, checkpointables)
        if path and self._incompatible is not None:
            self._check_loaded(path, self._incompatible)
        return extra

    def _check_loaded(self, path: str, incompatible: Any) -> None:
        missing = set(incompatible.missing_keys)
        parameters = {name for name, _ in self.model.named_parameters()}
        shapes = {key: (theirs, ours) for key, theirs, ours in incompatible.incorrect_shapes}
        if parameters and parameters <= missing:
            raise ValueError(
                f"Weights {path} fill none of the model's {len(parameters)} parameters (no name "
                f"with a matching shape): weights of another architecture? "
                f"Mismatched shapes: {len(shapes)}, e.g. "
                f"{dict(list(shapes.items())[:3]) or '-'}; check MODEL.WEIGHTS and the config."
            )
        if self.require_weights == "all" and missing:
            examples = [
                (
                    f"{key} (file {list(shapes[key][0])}, model {list(shapes[key][1])})"
                    if key in shapes
                    else f"{key} (absent)"
                )
                for key in sorted(missing)[:5]
            ]
            raise ValueError(
                f"Weights {path} do not fit the model: {len(missing)} parameter(s)/buffer(s) "
                f"missing or of another shape, e.g. {'; '.join(examples)}. Another number of "
                "classes (MODEL.MUSU.NUM_CLASSES) or anchors, or another architecture?"
            )

    # ----------------------------------------------------------------------------------------
    # --resume: the newest checkpoint that loads.
    # ----------------------------------------------------------------------------------------

    def _resumable_files(self) -> list[str]:
        """``model_final.pth`` then ``model_<iteration>.pth`` of ``save_dir``, newest first."""
        if not self._is_local() or not os.path.isdir(self.save_dir):
            return []
        found = [m for m in map(_RESUMABLE.match, os.listdir(self.save_dir)) if m]
        found.sort(key=lambda m: float("inf") if m.group(1) == "final" else int(m.group(1)))
        return [os.path.join(self.save_dir, m.group(0)) for m in reversed(found)]

    def has_checkpoint(self) -> bool:
        """Whether ``--resume`` has something to continue from: a ``last_checkpoint`` tag, or (in
        a local folder) a ``model_final.pth`` / ``model_<iteration>.pth``."""
        return super().has_checkpoint() or bool(self._resumable_files())

    def resume_or_load(self, path: str, *, resume: bool = True) -> dict[str, Any]:
        """Without ``resume``, or without any checkpoint in ``save_dir``: load ``path`` (weights
        only, as fvcore does). With ``resume``: load the checkpoint ``last_checkpoint`` names;
        if the tag is missing, or names a file that is gone or does not load (truncated,
        corrupt, refused), continue from the newest ``model_final.pth`` / ``model_<iteration>
        .pth`` that loads, with a warning that names every file skipped and why.

        Nothing is lost or silently replaced: each skipped file that exists is renamed to
        ``<name>.unreadable`` (the resumed run would otherwise overwrite it when it reaches that
        iteration), and ``last_checkpoint`` is re-tagged to the file resumed from. When
        checkpoints exist but none loads, :class:`NoResumableCheckpointError` names
        ``last_checkpoint`` and lists the folder, and nothing is renamed.
        """
        if not resume or not self._is_local():
            return super().resume_or_load(path, resume=resume)
        tag = os.path.join(self.save_dir, "last_checkpoint")
        tagged = self.get_checkpoint_file() if super().has_checkpoint() else ""
        candidates = [tagged] if tagged and os.path.isfile(tagged) else []
        candidates += [f for f in self._resumable_files() if f != tagged]
        if not candidates and not tagged:
            return super().resume_or_load(path, resume=False)
        skipped: list[str] = []
        if tagged and not os.path.isfile(tagged):
            skipped.append(f"{tagged}: named by {tag}, but it does not exist")
        elif not tagged:
            skipped.append(f"{tag} does not exist")
        unreadable: list[str] = []
        for candidate in candidates:
            try:
                checkpoint = self._read_checkpoint(candidate)
            except WeightsFileError as error:
                skipped.append(f"{candidate}: {error}")
                unreadable.append(candidate)
                continue
            self._preloaded = (candidate, checkpoint)
            try:
                extra = self.load(candidate)
            finally:
                self._preloaded = None
            if candidate != tagged:
                self._recover(candidate, skipped, unreadable)
            return extra
        raise NoResumableCheckpointError(
            f"--resume: no checkpoint in {self.save_dir} loads ({tag} "
            f"{'names ' + os.path.basename(tagged) if tagged else 'is missing'}). Tried, newest "
            "first:\n  " + "\n  ".join(skipped) + f"\nThe folder holds: {_listing(self.save_dir)}."
            " Restore a checkpoint, or start again without --resume in a new OUTPUT_DIR."
        )

    def _recover(self, resumed: str, skipped: list[str], unreadable: list[str]) -> None:
        """After resuming from an older file: set the unreadable ones aside, re-tag, warn."""
        moved = []
        if self.save_to_disk:
            for path in unreadable:
                target = _free_name(path + UNREADABLE_SUFFIX)
                os.replace(path, target)
                moved.append(f"{os.path.basename(path)} -> {os.path.basename(target)}")
            self.tag_last_checkpoint(os.path.basename(resumed))
        logger.warning(
            "--resume: continuing from %s, the newest checkpoint in %s that loads. Skipped:\n  %s"
            "%s",
            resumed,
            self.save_dir,
            "\n  ".join(skipped),
            f"\nRenamed (kept, not overwritten by this run): {', '.join(moved)}" if moved else "",
        )

    def _is_local(self) -> bool:
        return bool(self.save_dir) and "://" not in self.save_dir

    def _write(self, basename: str, mode: str, write: Callable[[IO], None]) -> str:
        save_file = os.path.join(self.save_dir, basename)
        os.makedirs(self.save_dir, exist_ok=True)
        with atomic_write(save_file, mode) as f:
            write(f)
        return save_file

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically, then tag it as the last checkpoint."""
        if not self._is_local() or not self.save_to_disk:
            super().save(name, **kwargs)
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        if os.path.basename(basename) != basename:
            raise ValueError(f"checkpoint name must be a file name, got {name!r}")
        self.logger.info("Saving checkpoint to %s", os.path.join(self.save_dir, basename))
        self._write(basename, "wb", lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._is_local():
            super().tag_last_checkpoint(last_filename_basename)
            return
        self._write("last_checkpoint", "w", lambda f: f.write(last_filename_basename))


def _model_zoo_pickle(data: dict[str, Any], logger: logging.Logger) -> dict[str, Any]:
    """A ``.pkl`` checkpoint as Detectron2 loads it: its model-zoo format as it is, any other
    dict as Detectron1 / Caffe2 weights (``"blobs"`` if present; ``*_momentum`` dropped)."""
    if "model" in data and "__author__" in data:
        logger.info("Reading a file from '%s'", data["__author__"])
        return data
    blobs = data.get("blobs", data)
    if not isinstance(blobs, dict):
        blobs = {}
    weights = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
    return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}


def _check_state_dict(filename: str, checkpoint: Any) -> None:
    """``WeightsFileError`` naming ``filename`` unless ``checkpoint["model"]`` maps names to
    tensors or numpy arrays."""
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    problem = None
    if not isinstance(model, dict):
        problem = f"its 'model' entry is a {type(model).__name__}, not a state dict"
    elif not model:
        problem = "it holds no weights (an empty state dict)"
    else:
        for key, value in model.items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                problem = f"'model' entry {key!r} is a {type(value).__name__}, not a tensor"
                break
    if problem:
        raise WeightsFileError(f"Weights file {filename} is not a model checkpoint: {problem}.")


def _free_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist."""
    candidate, index = path, 0
    while os.path.exists(candidate):
        index += 1
        candidate = f"{path}.{index}"
    return candidate


def _listing(folder: str) -> str:
    """The folder's entries with their sizes, for error messages."""
    entries = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        size = f"{os.path.getsize(full)} bytes" if os.path.isfile(full) else "folder"
        entries.append(f"{name} ({size})")
    return ", ".join(entries) or "nothing"
