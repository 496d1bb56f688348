"""Test-suite setup (repository root, so it covers tests/ and projects/*/tests).

* Every requirement must be present; a missing one stops the run loudly. Tests never skip
  because a dependency is absent: they fail here, naming the fix.
* The scripts (``train_net.py`` at the root, ``tools/*.py``, ``tools/analysis/*.py``,
  ``tools/benchmarks/*.py``) are importable by name in tests (``import train_net``,
  ``import compare``): this is the one place that edits ``sys.path``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent
SCRIPT_FOLDERS = tuple(
    REPO_ROOT / folder for folder in ("", "tools", "tools/analysis", "tools/benchmarks")
)

_FIX = "Run `bash tools/install.sh` (or `bash tools/test.sh`, which installs and then tests)."


def _check_requirements() -> list[str]:
    problems = []
    for module, hint in [
        ("torch", "torch"),
        ("torchvision", "torchvision (built for the installed torch)"),
        ("detectron2", "Detectron2 (not on PyPI: set DETECTRON2_SRC to a clone)"),
        ("detectron2._C", "Detectron2's compiled ops (rebuild Detectron2 against this torch)"),
        ("fvcore", "fvcore"),
        ("iopath", "iopath"),
        ("pycocotools", "pycocotools"),
        ("cv2", "opencv-python-headless"),
        ("hypothesis", "hypothesis"),
        ("matplotlib", "matplotlib"),
        ("onnx", "onnx (the export extra: pip install -e .[export])"),
        ("onnxruntime", "onnxruntime (the export extra: pip install -e .[export])"),
        ("timm", "timm (the vit extra, for Detectron2's ViT: pip install -e .[vit])"),
        ("musu", "musu (pip install -e .)"),
    ]:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure is a missing requirement
            problems.append(f"  - {hint}: `import {module}` failed: {error!r}")
    if not problems:
        try:
            import torch
            import torchvision

            boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]])
            torchvision.ops.nms(boxes, torch.tensor([1.0, 0.5]), 0.5)
        except Exception as error:  # noqa: BLE001
            problems.append(
                f"  - torchvision's ops do not run with this torch ({error!r}): install a "
                "matching pair (python3 -m pip install --force-reinstall torch torchvision)"
            )
    return problems


def pytest_configure(config: pytest.Config) -> None:
    for folder in SCRIPT_FOLDERS:
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    problems = _check_requirements()
    if problems:
        pytest.exit(
            "musu's test requirements are missing:\n" + "\n".join(problems) + "\n" + _FIX,
            returncode=3,
        )


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread():
    """One intra-op thread for the whole suite: the tests' models are tiny, and on a 2-core
    machine with other work running, multi-threaded small ops mostly wait on each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
