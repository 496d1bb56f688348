"""musu.model_zoo's config lookup (every config of the repository, as package data), the
published-weights table (``musu/model_zoo/models.json``), and MODEL_ZOO.md's agreement with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from musu import model_zoo
from musu.model_zoo import MODEL_ZOO_FILES
from musu.model_zoo.file_io import DEFAULT_MODEL_ZOO_URL, HASH_PREFIX_LENGTH, PREFIX, resolve
from musu.model_zoo.table import TABLE_FILE, read_table

from publish_model import render_table  # tools/publish_model.py (conftest.py: tools/ on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIGS = sorted(
    p.relative_to(REPO_ROOT / "configs").as_posix() for p in (REPO_ROOT / "configs").rglob("*.yaml")
)


def test_repository_configs_found() -> None:
    assert "Synthetic/musu_paper_R_18_FPN_1200it.yaml" in REPO_CONFIGS
    assert "COCO-Detection/musu_R_50_FPN_1x.yaml" in REPO_CONFIGS
    assert model_zoo.list_configs() == REPO_CONFIGS


@pytest.mark.parametrize("config", REPO_CONFIGS)
def test_get_config_file_for_every_config(config: str) -> None:
    path = Path(model_zoo.get_config_file(config))
    assert path.is_file()
    assert path.read_bytes() == (REPO_ROOT / "configs" / config).read_bytes()
    if config != "Base-MuSu.yaml":
        cfg = model_zoo.get_config(config)  # add_musu_config first: MODEL.MUSU keys merge
        assert "MUSU" in cfg.MODEL


def test_packaged_configs_folder_mirrors_the_repository() -> None:
    """``setup.py`` links configs/ into the package; where that link exists, it is used."""
    packaged = REPO_ROOT / "musu" / "model_zoo" / "configs"
    root = model_zoo.configs_root()
    if packaged.is_dir():
        assert root == packaged
    else:
        assert root == REPO_ROOT / "configs"  # editable checkout without the link
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    assert files == REPO_CONFIGS  # the link (or copy) shows every config


@pytest.mark.parametrize("bad", ["nope.yaml", "../setup.cfg", "/etc/hostname", "Synthetic"])
def test_unknown_config_rejected(bad: str) -> None:
    with pytest.raises(RuntimeError, match="not available in MuSu's model zoo"):
        model_zoo.get_config_file(bad)


def test_published_table_is_consistent() -> None:
    for name, entry in MODEL_ZOO_FILES.items():
        assert f"{name}.yaml" in REPO_CONFIGS
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.file == f"{name}/model_final_{entry.sha256[:HASH_PREFIX_LENGTH]}.pth"
        assert model_zoo.get_checkpoint_url(f"{name}.yaml") == PREFIX + entry.file
        assert (
            model_zoo.get_config(f"{name}.yaml", trained=True).MODEL.WEIGHTS == PREFIX + entry.file
        )
        assert resolve(PREFIX + name).sha256 == entry.sha256  # the full hash, not the prefix


def test_model_zoo_md_lists_every_published_model_and_every_config_link_exists() -> None:
    text = (REPO_ROOT / "MODEL_ZOO.md").read_text()
    for entry in MODEL_ZOO_FILES.values():
        assert f"{PREFIX}{entry.file}" in text
    links = re.findall(r"\]\((configs/[^)]+\.yaml)\)", text)
    assert links, "MODEL_ZOO.md links no config"
    for link in links:
        assert (REPO_ROOT / link).is_file(), link
    for published in re.findall(r"musu://[\w./-]+/model_final_[0-9a-f]+\.pth", text):
        assert published[len(PREFIX) :] in {e.file for e in MODEL_ZOO_FILES.values()}, published


def test_model_zoo_md_table_is_rendered_from_models_json() -> None:
    """MODEL_ZOO.md's table of published models is ``tools/publish_model.py --print-table``."""
    text = (REPO_ROOT / "MODEL_ZOO.md").read_text()
    assert read_table(TABLE_FILE) == MODEL_ZOO_FILES
    assert render_table(MODEL_ZOO_FILES, DEFAULT_MODEL_ZOO_URL) in text


def test_table_file_errors_name_the_record(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('{"models": [{"name": "A/b", "file": "A/b/model_final_0.pth"}]}')
    with pytest.raises(ValueError, match=r"models\.json: model record 0 \(A/b\)"):
        read_table(path)
