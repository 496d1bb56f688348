"""Build shim; metadata lives in setup.cfg.

Before building, the repository's top-level ``configs/`` folder is linked (or, where symlinks are
unavailable, copied) to ``musu/model_zoo/configs`` so that wheels ship the config files as package
data of ``musu.model_zoo`` (see ``[options.package_data]``) and ``musu.model_zoo.get_config_file``
finds them in any install. The link is generated and git-ignored; ``configs/`` stays the source.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def link_model_zoo_configs() -> None:
    """Make ``musu/model_zoo/configs`` mirror ``configs/`` (no-op when building from an sdist
    that already holds the copied files but no ``configs/``)."""
    source = ROOT / "configs"
    target = ROOT / "musu" / "model_zoo" / "configs"
    if not source.is_dir():
        return
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    try:
        os.symlink(os.path.relpath(source, target.parent), target, target_is_directory=True)
    except OSError:  # e.g. Windows without the symlink privilege
        shutil.copytree(source, target)


link_model_zoo_configs()
setup()
