"""Every bad input a user can give, one row each: what goes in, the exception (or warning) that
must come out, and the words its message must contain.

Rows run through the entry points a user calls (``train_net.main``, ``tools/demo.py``'s
``main``, ``musu.build_config``, the model zoo, the data catalog). After every row:

* the marker file that each malicious weights / config file tries to create does not exist
  (no file given as input ran code);
* a previous run's files in ``OUTPUT_DIR`` (``last_checkpoint``, a checkpoint, metrics) are
  byte-for-byte unchanged and no ``model_final.pth`` appeared.

A new case is one row in :data:`CASES`. Data: a 4-image 64 px synthetic split per test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tokenize
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import demo  # tools/demo.py (conftest.py puts tools/ on sys.path)
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

import musu
from musu.cli import parse_tool_args
from musu.data import UnreadableImageError, register_coco_dataset
from musu.data.synthetic import ensure_split
from musu.engine import AtomicCheckpointer, UnsafeWeightsError, WeightsFileError
from musu.model_zoo import ModelZooError

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
WARNING = "warning"  # expected outcome of a row that must log a warning and go on


class _RunsCode:
    """Unpickling this runs ``os.system("touch <marker>")``: what an attacker's file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@dataclass
class Env:
    """One row's world: a temporary folder, a registered 5-class dataset, a previous run."""

    tmp: Path
    dataset: str
    json_file: Path
    image_root: Path
    marker: Path = field(init=False)

    def __post_init__(self) -> None:
        self.marker = self.tmp / "CODE_RAN"
        self.output_dir = self.tmp / "out"
        self.output_dir.mkdir()
        self.previous = {
            "model_0000009.pth": b"weights of a previous run",
            "last_checkpoint": b"model_0000009.pth",
            "metrics.json": b'{"iteration": 9}\n',
        }
        for name, content in self.previous.items():
            (self.output_dir / name).write_bytes(content)

    # Files --------------------------------------------------------------------------------

    def evil_pkl(self) -> str:
        path = self.tmp / "evil.pkl"
        content = {"model": _RunsCode(self.marker), "__author__": "attacker"}
        path.write_bytes(pickle.dumps(content, protocol=2))
        return str(path)

    def evil_pth(self) -> str:
        path = self.tmp / "evil.pth"
        torch.save({"model": {"w": torch.zeros(1)}, "x": _RunsCode(self.marker)}, path)
        return str(path)

    def text_file(self) -> str:
        path = self.tmp / "notes.pth"
        path.write_text("these are my notes, not weights\n")
        return str(path)

    def json_with(self, edit: Callable[[dict], Any] | None = None, text: str | None = None) -> str:
        path = self.tmp / "broken.json"
        if text is None:
            content = json.loads(self.json_file.read_text())
            edit(content)
            text = json.dumps(content)
        path.write_text(text)
        return str(path)

    def config_with(self, text: str) -> str:
        path = self.tmp / "sub" / "my_config.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return str(path)

    def model_file(self, opts: list[str], name: str) -> str:
        model = build_model(musu.build_config(CONFIG, ["MODEL.DEVICE", "cpu", *opts]))
        AtomicCheckpointer(model, str(self.tmp)).save(name)
        return str(self.tmp / f"{name}.pth")

    # Entry points -------------------------------------------------------------------------

    def train_net(self, *flags: str, opts: tuple[str, ...] = (), dataset: str = "", config=None):
        dataset = dataset or self.dataset
        argv = [
            *flags,
            "--config-file", str(CONFIG if config is None else config),
            "MODEL.DEVICE", "cpu",
            "OUTPUT_DIR", str(self.output_dir),
            "DATASETS.TRAIN", f"('{dataset}',)",
            "DATASETS.TEST", f"('{dataset}',)",
            "DATALOADER.NUM_WORKERS", "0",
            "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.MAX_ITER", "1",
            "INPUT.MIN_SIZE_TRAIN", "(64,)",
            "INPUT.MAX_SIZE_TRAIN", "64",
            "INPUT.MIN_SIZE_TEST", "64",
            "INPUT.MAX_SIZE_TEST", "64",
            *opts,
        ]  # fmt: skip
        return train_net.main(parse_tool_args(train_net.build_parser(), argv))

    def cfg(self, *opts: Any, dataset: str = ""):
        """The training config of :meth:`train_net`, through ``train_net.setup``."""
        dataset = dataset or self.dataset
        argv = ["--config-file", str(CONFIG), "MODEL.DEVICE", "cpu"]
        argv += ["OUTPUT_DIR", str(self.tmp / "setup"), "DATASETS.TRAIN", f"('{dataset}',)"]
        argv += ["DATASETS.TEST", f"('{dataset}',)", "DATALOADER.NUM_WORKERS", "0"]
        argv += ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)"]
        argv += ["INPUT.MAX_SIZE_TRAIN", "64", *map(str, opts)]
        return train_net.setup(parse_tool_args(train_net.build_parser(), argv))

    def demo(self, *argv: str, weights: str | None = None) -> int:
        image = next(iter(sorted(self.image_root.iterdir())))
        base = ["--config-file", str(CONFIG), "--input", str(image)]
        base += ["--output", str(self.tmp / "demo_out")] if "--output" not in argv else []
        opts = ["--opts", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "64"]
        opts += ["MODEL.WEIGHTS", weights or self.model_file([], "demo_weights")]
        return demo.main([*base, *argv, *opts])

    def register(self, name: str, json_file: str | Path, image_root: Path | None = None) -> str:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_dataset(name, json_file, image_root or self.image_root)
        return name

    def copy_dataset(self, name: str, damage: Callable[[Path, list[str]], None]) -> str:
        """A copy of the split with ``damage(image_root, file_names)`` applied, registered."""
        root = self.tmp / name
        shutil.copytree(self.image_root, root / "images")
        names = [image["file_name"] for image in json.loads(self.json_file.read_text())["images"]]
        damage(root / "images", names)
        return self.register(name, self.json_file, root / "images")

    def mirror(self, monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> None:
        """A local model-zoo mirror holding ``files`` and an empty cache, through the
        environment variables a user sets."""
        for relpath, content in files.items():
            (self.tmp / "mirror" / relpath).parent.mkdir(parents=True, exist_ok=True)
            (self.tmp / "mirror" / relpath).write_bytes(content)
        (self.tmp / "mirror").mkdir(exist_ok=True)
        monkeypatch.setenv("MUSU_MODEL_ZOO_URL", str(self.tmp / "mirror"))
        monkeypatch.setenv("MUSU_CACHE_DIR", str(self.tmp / "cache"))


def _hashed(content: bytes, stem: str, suffix: str) -> str:
    return f"{stem}/model_final_{hashlib.sha256(content).hexdigest()[:12]}{suffix}"


def _musu_evil_pkl(env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    content = Path(env.evil_pkl()).read_bytes()
    relpath = _hashed(content, "evil", ".pkl")
    env.mirror(monkeypatch, {relpath: content})
    return env.train_net("--eval-only", opts=("MODEL.WEIGHTS", f"musu://{relpath}"))


def _musu_missing(env: Env, monkeypatch: pytest.MonkeyPatch) -> Any:
    env.mirror(monkeypatch, {})
    return env.train_net(
        "--eval-only", opts=("MODEL.WEIGHTS", "musu://x/model_final_0123456789ab.pth")
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _iterate_train_loader(env: Env, dataset: str) -> None:
    loader = iter(train_net.Trainer.build_train_loader(env.cfg(dataset=dataset)))
    for _ in range(4):  # 2 batches of 2 cover the 4 images
        next(loader)


def _two_categories(content: dict) -> None:
    content["categories"] = content["categories"][:2]
    kept = [c["id"] for c in content["categories"]]
    for annotation in content["annotations"]:
        annotation["category_id"] = kept[annotation["id"] % 2]


def _first_box(value: float) -> Callable[[dict], None]:
    def edit(content: dict) -> None:
        content["annotations"][0]["bbox"][2] = value

    return edit


def _category(value: int) -> Callable[[dict], None]:
    def edit(content: dict) -> None:
        content["annotations"][2]["category_id"] = value

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda content: content.pop(key)


@dataclass(frozen=True)
class Case:
    """``run(env, monkeypatch)`` must raise ``expected`` (or log a warning if it is
    :data:`WARNING`) whose message, or argparse's usage error, contains every one of ``words``
    (``{tmp}`` stands for the row's temporary folder); with ``before_setup``, nothing is added
    to ``OUTPUT_DIR`` either (the config failed before ``default_setup`` wrote to it)."""

    name: str
    run: Callable[[Env, pytest.MonkeyPatch], Any]
    expected: type[BaseException] | str
    words: tuple[str, ...]
    before_setup: bool = False  # fails before train_net.setup writes anything to OUTPUT_DIR
    absent: tuple[str, ...] = ()  # words the message must not contain


CASES = [
    # --- Weights files that try to run code: refused, naming the file and the global. ---
    Case(
        "malicious_pkl_train_net_eval_only",
        lambda env, mp: env.train_net("--eval-only", opts=("MODEL.WEIGHTS", env.evil_pkl())),
        UnsafeWeightsError,
        ("Refused to load", "{tmp}/evil.pkl", "posix.system", "could run code"),
    ),
    Case(
        "malicious_pth_train_net_eval_only",
        lambda env, mp: env.train_net("--eval-only", opts=("MODEL.WEIGHTS", env.evil_pth())),
        UnsafeWeightsError,
        ("Refused to load", "{tmp}/evil.pth", "posix.system"),
    ),
    Case(
        "malicious_pth_with_torch_force_no_weights_only_load",
        lambda env, mp: (
            mp.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1"),
            env.train_net("--eval-only", opts=("MODEL.WEIGHTS", env.evil_pth())),
        ),
        UnsafeWeightsError,
        ("{tmp}/evil.pth", "posix.system"),
    ),
    Case(
        "malicious_pkl_train_net_training_init",
        lambda env, mp: env.train_net(opts=("MODEL.WEIGHTS", env.evil_pkl())),
        UnsafeWeightsError,
        ("{tmp}/evil.pkl", "posix.system"),
    ),
    Case(
        "malicious_pkl_demo",
        lambda env, mp: env.demo(weights=env.evil_pkl()),
        UnsafeWeightsError,
        ("{tmp}/evil.pkl", "posix.system"),
    ),
    Case(
        "malicious_pth_demo",
        lambda env, mp: env.demo(weights=env.evil_pth()),
        UnsafeWeightsError,
        ("{tmp}/evil.pth", "posix.system"),
    ),
    Case(
        "malicious_pkl_model_zoo_load_model",
        lambda env, mp: musu.model_zoo.load_model(musu.build_config(CONFIG), env.evil_pkl()),
        UnsafeWeightsError,
        ("{tmp}/evil.pkl", "posix.system"),
    ),
    Case(
        "malicious_pkl_behind_musu_url",
        _musu_evil_pkl,
        ModelZooError,
        ("not a tensor-only checkpoint", "{tmp}/cache/model_zoo/evil/model_final_", "posix.system"),
    ),
    # --- Weights that are not a checkpoint, or do not fit. ---
    Case(
        "text_file_as_weights",
        lambda env, mp: env.train_net("--eval-only", opts=("MODEL.WEIGHTS", env.text_file())),
        WeightsFileError,
        ("{tmp}/notes.pth", "a text file", "these are my notes"),
    ),
    Case(
        "truncated_weights",
        lambda env, mp: (
            _truncate(Path(w := env.model_file([], "cut"))),
            env.train_net("--eval-only", opts=("MODEL.WEIGHTS", w)),
        ),
        WeightsFileError,
        ("{tmp}/cut.pth", "zip archive", "truncated"),
    ),
    Case(
        "missing_weights_file",
        lambda env, mp: env.train_net(
            "--eval-only", opts=("MODEL.WEIGHTS", str(env.tmp / "no.pth"))
        ),
        FileNotFoundError,
        ("{tmp}/no.pth", "MODEL.WEIGHTS"),
    ),
    Case(
        "eval_only_without_weights",
        lambda env, mp: env.train_net("--eval-only"),
        ValueError,
        ("--eval-only needs weights", "MODEL.WEIGHTS"),
    ),
    Case(
        "weights_of_another_class_count_for_evaluation",
        lambda env, mp: env.train_net(
            "--eval-only",
            opts=("MODEL.WEIGHTS", env.model_file(["MODEL.MUSU.NUM_CLASSES", "3"], "three")),
        ),
        ValueError,
        ("{tmp}/three.pth", "head.cls_score", "MODEL.MUSU.NUM_CLASSES"),
    ),
    Case(
        "weights_of_another_architecture_for_training",
        lambda env, mp: (
            torch.save({"model": {"layer.weight": torch.zeros(2, 2)}}, env.tmp / "other.pth"),
            env.train_net(opts=("MODEL.WEIGHTS", str(env.tmp / "other.pth"))),
        ),
        ValueError,
        ("{tmp}/other.pth", "fill none of the model"),
    ),
    Case(
        "musu_download_fails",
        _musu_missing,
        ModelZooError,
        ("Could not download", "x/model_final_0123456789ab.pth", "MUSU_MODEL_ZOO_URL", "mirror"),
    ),
    # --- Dataset JSON. ---
    Case(
        "json_that_does_not_parse",
        lambda env, mp: env.register("bad_json", env.json_with(text='{"images": [')),
        ValueError,
        ("{tmp}/broken.json", "'bad_json'", "not valid JSON", "line 1"),
    ),
    *(
        Case(
            f"json_without_{key}",
            lambda env, mp, key=key: env.register("no_key", env.json_with(_drop(key))),
            ValueError,
            ("{tmp}/broken.json", "'no_key'", f"no '{key}' key"),
        )
        for key in ("images", "annotations", "categories")
    ),
    Case(
        "json_missing",
        lambda env, mp: env.register("no_json", env.tmp / "nowhere.json"),
        FileNotFoundError,
        ("{tmp}/nowhere.json", "'no_json'"),
    ),
    Case(
        "unknown_category_id",
        lambda env, mp: DatasetCatalog.get(env.register("cat99", env.json_with(_category(99)))),
        ValueError,
        ("{tmp}/broken.json", "category_id 99", "[1, 2, 3, 4, 5]", "annotation id", ".jpg"),
    ),
    Case(
        "non_finite_bbox",
        lambda env, mp: DatasetCatalog.get(env.register("inf", env.json_with(_first_box(1e999)))),
        ValueError,
        ("{tmp}/broken.json", "non-finite", "annotation id"),
    ),
    Case(
        "empty_dataset",
        lambda env, mp: env.train_net(
            "--resume",
            dataset=env.register("no_images", env.json_with(lambda c: c.update(images=[]))),
        ),
        AssertionError,
        ("no_images",),
    ),
    Case(
        "missing_image_files_before_training",
        lambda env, mp: env.train_net(
            "--resume",
            dataset=env.copy_dataset(
                "gone", lambda root, names: [(root / n).unlink() for n in names[1:3]]
            ),
        ),
        FileNotFoundError,
        ("'gone'", "2 image file(s)", "000001.jpg", "000002.jpg"),
    ),
    Case(
        "missing_image_files_before_evaluation",
        lambda env, mp: train_net.Trainer.build_test_loader(
            env.cfg(),
            env.copy_dataset("gone_eval", lambda root, names: (root / names[1]).unlink()),
        ),
        FileNotFoundError,
        ("'gone_eval'", "000001.jpg"),
    ),
    Case(
        "check_data_lists_every_bad_image",
        lambda env, mp: env.train_net(
            "--check-data",
            "--resume",
            dataset=env.copy_dataset(
                "bad_images",
                lambda root, names: (
                    _truncate(root / names[0]),
                    (root / names[3]).write_text("not an image"),
                ),
            ),
        ),
        UnreadableImageError,
        ("2 image(s) cannot be read", "bad_images: ", "000000.jpg", "000003.jpg"),
        absent=("000001.jpg", "000002.jpg"),
    ),
    Case(
        "undecodable_image_while_training",
        lambda env, mp: _iterate_train_loader(
            env, env.copy_dataset("cut_image", lambda root, names: _truncate(root / names[2]))
        ),
        UnreadableImageError,
        ("'cut_image'", "000002.jpg", "truncated"),
    ),
    Case(
        "undecodable_image_while_evaluating",
        lambda env, mp: list(
            train_net.Trainer.build_test_loader(
                env.cfg(),
                env.copy_dataset("cut_eval", lambda root, names: _truncate(root / names[2])),
            )
        ),
        UnreadableImageError,
        ("'cut_eval'", "000002.jpg"),
    ),
    # --- Class counts. ---
    Case(
        "num_classes_smaller_than_dataset",
        lambda env, mp: train_net.Trainer.build_train_loader(env.cfg("MODEL.MUSU.NUM_CLASSES", 3)),
        ValueError,
        ("bad_inputs_train", "MODEL.MUSU.NUM_CLASSES = 3", ".jpg", "annotation ", "class index"),
    ),
    Case(
        "num_classes_larger_than_dataset",
        lambda env, mp: train_net.Trainer.build_train_loader(
            env.cfg(dataset=env.register("two", env.json_with(_two_categories)))
        ),
        WARNING,
        ("MODEL.MUSU.NUM_CLASSES = 5", "only 2 categories", "two: 2"),
    ),
    # --- Configs. ---
    Case(
        "base_that_points_nowhere",
        lambda env, mp: env.train_net(config=env.config_with('_BASE_: "../Base-Nowhere.yaml"\n')),
        FileNotFoundError,
        ("_BASE_", "{tmp}/sub/my_config.yaml", "'../Base-Nowhere.yaml'", "{tmp}/Base-Nowhere.yaml"),
        before_setup=True,
    ),
    Case(
        "config_with_python_tag",
        lambda env, mp: env.train_net(
            config=env.config_with(
                f'_BASE_: "{CONFIG}"\nOUTPUT_DIR: !!python/object/apply:os.system '
                f'["touch {env.marker}"]\n'
            )
        ),
        ValueError,
        ("{tmp}/sub/my_config.yaml", "yaml.safe_load", "python/object/apply"),
        before_setup=True,
    ),
    Case(
        "config_file_missing",
        lambda env, mp: env.train_net(config=env.tmp / "nope.yaml"),
        FileNotFoundError,
        ("{tmp}/nope.yaml",),
        before_setup=True,
    ),
    Case(
        "config_file_not_given",
        lambda env, mp: env.train_net(config=""),
        ValueError,
        ("--config-file is required",),
        before_setup=True,
    ),
    Case(
        "unknown_key_in_config_file",
        lambda env, mp: env.train_net(
            config=env.config_with(f'_BASE_: "{CONFIG}"\nMODEL:\n  MUSU:\n    TEMPERATUR: 5.0\n')
        ),
        KeyError,
        ("MODEL.MUSU.TEMPERATUR", "{tmp}/sub/my_config.yaml"),
        before_setup=True,
    ),
    *(
        Case(
            f"bad_option_{key}",
            lambda env, mp, key=key, value=value: env.train_net(opts=(key, value)),
            error,
            (key, *extra),
            before_setup=True,
        )
        for key, value, error, extra in [
            ("MODEL.MUSU.NOPE", "1", KeyError, ("command-line options",)),
            ("SOLVER.BASE_LRR", "0.1", KeyError, ()),
            ("MODEL.MUSU.ALPHA", "1.5", ValueError, ("[0.0, 1.0]", "1.5")),
            ("MODEL.MUSU.NUM_CLASSES", "0", ValueError, (">= 1",)),
            ("MODEL.MUSU.BAG_THRESHOLD", "'high'", ValueError, ("high",)),
            ("MODEL.MUSU.CRITERION", "'both'", ValueError, ("'both'", "mutual")),
            ("MODEL.LOAD_PROPOSALS", "True", ValueError, ("pickle.load", "PROPOSAL_FILES")),
        ]
    ),
    # --- tools/demo.py arguments. ---
    Case(
        "demo_output_is_a_file",
        lambda env, mp: env.demo("--output", env.text_file()),
        SystemExit,
        ("--output", "{tmp}/notes.pth", "not a folder"),
    ),
    *(
        Case(
            f"demo_{option[2:]}_{value}",
            lambda env, mp, option=option, value=value: env.demo(option, value),
            SystemExit,
            (option, value, words),
        )
        for option, value, words in [
            ("--confidence-threshold", "2", "outside [0, 1]"),
            ("--confidence-threshold", "-1", "outside [0, 1]"),
            ("--confidence-threshold", "nan", "outside [0, 1]"),
            ("--progress-every", "0", "less than 1"),
            ("--max-frames", "0", "less than 1"),
        ]
    ),
]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    return ensure_split(
        "train", tmp_path_factory.mktemp("bad_inputs"), num_images=4, seed=61, image_size=64
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_named(case: Case, split, tmp_path: Path, monkeypatch, capsys) -> None:
    env = Env(tmp_path, "", Path(split.json_file), Path(split.image_root))
    env.dataset = env.register("bad_inputs_train", split.json_file)
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in ("musu", "detectron2", "fvcore")]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        if case.expected == WARNING:
            case.run(env, monkeypatch)
            message = "\n".join(capture.messages)
        else:
            with pytest.raises(case.expected) as raised:  # type: ignore[arg-type]
                case.run(env, monkeypatch)
            message = str(raised.value) + "\n" + capsys.readouterr().err
    finally:
        for logger in loggers:
            logger.removeHandler(capture)
    for word in case.words:
        assert word.format(tmp=tmp_path) in message, (word, message)
    for word in case.absent:
        assert word.format(tmp=tmp_path) not in message, (word, message)
    assert not env.marker.exists(), "a file given as input ran code"
    for name, content in env.previous.items():
        assert (env.output_dir / name).read_bytes() == content, name
    assert not (env.output_dir / "model_final.pth").exists()
    if case.before_setup:
        assert sorted(p.name for p in env.output_dir.iterdir()) == sorted(env.previous)


def _state_as_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def test_detectron2_model_zoo_pkl_loads_everywhere(tmp_path: Path, monkeypatch) -> None:
    """A ``.pkl`` in Detectron2's model-zoo format (``{"model": {name: ndarray},
    "__author__", "matching_heuristics"}``, pickled by Python 2 style protocol 2, as the
    ``detectron2://ImageNetPretrained`` files are) loads through ``MODEL.WEIGHTS``, the model
    zoo's ``load_model`` and ``musu://``, with the same values."""
    cfg = musu.build_config(CONFIG, ["MODEL.DEVICE", "cpu"])
    torch.manual_seed(3)
    source = build_model(cfg)
    zoo_file = {
        "model": _state_as_numpy(source),
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
    }
    content = pickle.dumps(zoo_file, protocol=2)
    path = tmp_path / "R-18-zoo.pkl"
    path.write_bytes(content)

    torch.manual_seed(4)
    target = build_model(cfg)
    AtomicCheckpointer(target, require_weights="all").load(str(path))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name

    loaded = musu.model_zoo.load_model(cfg, str(path))
    assert torch.equal(loaded.head.cls_score.weight, source.head.cls_score.weight)

    relpath = f"zoo/model_final_{hashlib.sha256(content).hexdigest()[:12]}.pkl"
    (tmp_path / "mirror" / "zoo").mkdir(parents=True)
    (tmp_path / "mirror" / relpath).write_bytes(content)
    monkeypatch.setenv("MUSU_MODEL_ZOO_URL", str(tmp_path / "mirror"))
    monkeypatch.setenv("MUSU_CACHE_DIR", str(tmp_path / "cache"))
    via_url = musu.model_zoo.load_model(cfg, f"musu://{relpath}")
    assert torch.equal(via_url.head.bbox_pred.weight, source.head.bbox_pred.weight)


def test_caffe2_style_pkl_without_author_loads_by_name_matching(tmp_path: Path) -> None:
    """A ``.pkl`` with only arrays (Detectron1 / Caffe2 style: ``{"blobs": {...}}``, momentum
    blobs dropped) loads through name matching; pickled numpy scalars are accepted too."""
    layer = torch.nn.Linear(3, 2)
    blobs = {
        "weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bias": np.array([1.0, -1.0], dtype=np.float32),
        "weight_momentum": np.zeros((2, 3), np.float32),
        "lr": np.float32(0.1),
    }
    path = tmp_path / "c2.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=4))
    with pytest.raises(WeightsFileError, match=r"c2\.pkl.*'lr' is a float32"):
        AtomicCheckpointer(layer).load(str(path))
    del blobs["lr"]
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=4))
    AtomicCheckpointer(layer).load(str(path))
    assert torch.equal(layer.weight, torch.arange(6.0).reshape(2, 3))
    assert torch.equal(layer.bias, torch.tensor([1.0, -1.0]))


def _code_without_strings(path: Path) -> str:
    """The source of ``path`` without comments, docstrings and string literals."""
    with open(path, "rb") as f:
        tokens = [
            token.string
            for token in tokenize.tokenize(f.readline)
            if token.type not in (tokenize.COMMENT, tokenize.STRING, tokenize.ENCODING)
            and token.type != getattr(tokenize, "FSTRING_MIDDLE", -1)
        ]
    return "".join(tokens)


def test_every_weights_load_in_the_code_goes_through_the_safe_loader() -> None:
    """The library, the tools, the projects and train_net.py never call what unpickles without
    restriction: Detectron2's ``DetectionCheckpointer`` / ``DefaultPredictor`` (``pickle.load``
    for ``.pkl``), ``pickle.load``, ``torch.load`` without ``weights_only=True``, or YAML's
    unsafe loaders. (Tests may: they read files they wrote themselves.)"""
    allowed_pickle = {REPO / "musu" / "engine" / "weights_io.py"}
    sources = [
        REPO / "train_net.py",
        *(REPO / "musu").rglob("*.py"),
        *(REPO / "tools").rglob("*.py"),
    ]
    sources += [p for p in (REPO / "projects").rglob("*.py") if "tests" not in p.parts]
    problems = []
    for path in sources:
        code = _code_without_strings(path)
        for pattern in ("DetectionCheckpointer(", "DefaultPredictor(", "yaml.load(", "unsafe_load"):
            if pattern in code:
                problems.append(f"{path.relative_to(REPO)}: {pattern}")
        if path not in allowed_pickle and ("pickle.load" in code or "Unpickler(" in code):
            problems.append(f"{path.relative_to(REPO)}: pickle.load")
        for start in [i for i in range(len(code)) if code.startswith("torch.load(", i)]:
            depth, end = 0, start
            for end in range(start + len("torch.load"), len(code)):
                depth += {"(": 1, ")": -1}.get(code[end], 0)
                if depth == 0:
                    break
            call = code[start : end + 1]
            if "weights_only=True" not in call:
                problems.append(f"{path.relative_to(REPO)}: {call}")
    assert problems == []


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pkl_reader_takes_numpy_pickles_of_every_protocol(tmp_path: Path, protocol: int) -> None:
    """Arrays, scalars, bytes (``_codecs.encode`` under protocol 2) and OrderedDicts load;
    an array of Python objects is refused even though its items are plain."""
    content = {
        "model": {"w": np.arange(4, dtype=np.float16).reshape(2, 2)},
        "step": np.int64(7),
        "raw": b"\x00\xff",
        "__author__": "me",
    }
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    loaded = musu.engine.load_weights_file(path)
    assert loaded["model"]["w"].dtype == np.float16
    assert np.array_equal(loaded["model"]["w"], [[0, 1], [2, 3]])
    assert loaded["step"] == 7 and loaded["raw"] == b"\x00\xff" and loaded["__author__"] == "me"

    path.write_bytes(pickle.dumps({"model": {"w": np.array([1, "x"], dtype=object)}}, protocol))
    with pytest.raises(UnsafeWeightsError, match=r"plain\.pkl.*array of Python objects"):
        musu.engine.load_weights_file(path)


class _Call:
    """Pickles as a call of ``function(*args)``: how a crafted file reaches numpy's helpers."""

    def __init__(self, function: Callable, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return (self.function, self.args)


@pytest.mark.parametrize(
    "name, content, words",
    [
        (  # an object array over attacker bytes: forged pointers, dereferenced by OrderedDict
            "forged_pointers",
            {"model": _Call(OrderedDict, _Call(np.ndarray, (2,), np.dtype("O"), b"A" * 16))},
            "array of Python objects",
        ),
        (  # numpy.ndarray called with a plain dtype and a buffer of the wrong size
            "ndarray_call",
            {"model": {"w": _Call(np.ndarray, (4,), np.dtype("f4"), b"A" * 4)}},
            "numpy.ndarray called directly",
        ),
        (  # a structured dtype whose field lies past the item: a read outside the buffer
            "structured_dtype",
            {
                "model": {
                    "w": np.zeros(2, dtype={"names": ["a"], "formats": ["f8"], "offsets": [0]})
                }
            },
            "structured",
        ),
    ],
)
def test_pkl_reader_refuses_crafted_numpy_objects(
    tmp_path: Path, name: str, content: dict, words: str
) -> None:
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(UnsafeWeightsError, match=words):
        musu.engine.load_weights_file(path)


def test_pkl_reader_rebuilds_arrays_of_every_layout(tmp_path: Path) -> None:
    """Fortran order, big-endian, empty, 0-d and non-contiguous arrays, and an array named twice
    (the pickle's memo), come back equal, with their dtypes and shapes."""
    shared = np.arange(3.0)
    arrays = {
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(4, dtype=">f4"),
        "empty": np.zeros((0, 3), np.float32),
        "zero_d": np.array(3.5),
        "strided": np.arange(12.0).reshape(3, 4)[:, ::2],
        "bool": np.array([True, False]),
        "shared": shared,
    }
    for protocol in (2, 4, 5):
        path = tmp_path / f"layouts_{protocol}.pkl"
        path.write_bytes(pickle.dumps({"model": arrays, "again": shared}, protocol=protocol))
        loaded = musu.engine.load_weights_file(path)
        for key, value in arrays.items():
            got = loaded["model"][key]
            assert got.dtype == value.dtype and got.shape == value.shape, (protocol, key)
            assert np.array_equal(got, value), (protocol, key)
        assert isinstance(loaded["again"], np.ndarray) and np.array_equal(loaded["again"], shared)
