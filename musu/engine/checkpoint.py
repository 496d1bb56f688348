"""Crash-safe checkpointing: a checkpoint file either holds a complete checkpoint or is absent.

fvcore's ``Checkpointer.save`` streams ``torch.save`` straight into ``model_XXXXXXX.pth`` and then
overwrites ``last_checkpoint`` in place, so a process killed mid-write leaves a truncated file that
``--resume`` then tries to load. :class:`AtomicCheckpointer` writes each file to a temporary file in
the same folder, flushes and fsyncs it, renames it over the target with ``os.replace`` (atomic on
POSIX and Windows) and fsyncs the folder. ``last_checkpoint`` is only re-tagged after its
checkpoint is in place, so it always names a complete file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "atomic_write", "TMP_SUFFIX"]

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".partial"
"""Suffix of the temporary files (``.<target name>.<random>.partial``) being written."""


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
        if self._is_local() and self.save_to_disk:
            for stale in Path(self.save_dir).glob(f".*{TMP_SUFFIX}"):
                logger.warning("Removing %s, left by an interrupted checkpoint write", stale)
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()

    def _load_model(self, checkpoint: Any) -> Any:
        self._incompatible = super()._load_model(checkpoint)
        return self._incompatible

    def load(self, path: str, checkpointables: Any = None) -> dict[str, Any]:
        """fvcore's ``load``, then a check of how much of the model the file filled:
        ``ValueError`` naming the file if none of the model's parameters were loaded
        (weights of another architecture), or, with ``require_weights="all"`` (evaluation), if
        any was missing or had another shape (e.g. another number of classes)."""
        self._incompatible = None
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
