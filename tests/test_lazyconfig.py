"""The LazyConfig files build what their YAML twins build: equal parameters from the same seed,
equal losses on one batch, the same optimizer, schedule and data; every Python config loads."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Dict, List

import detectron2.data.transforms as T
import pytest
import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.modeling import build_model
from detectron2.solver import LRMultiplier, build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage

import musu
from musu.cli import parse_tool_args
from musu.data.synthetic import ensure_split

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TWINS = {  # LazyConfig file: its YAML twin
    "Synthetic/musu_R_18_FPN_1200it.py": "Synthetic/musu_R_18_FPN_1200it.yaml",
    "BCCD/musu_R_18_FPN_1800it.py": "BCCD/musu_R_18_FPN_1800it.yaml",
    "Cards/musu_R_18_FPN_1800it.py": "Cards/musu_R_18_FPN_1800it.yaml",
    "COCO-Detection/musu_R_50_FPN_1x.py": "COCO-Detection/musu_R_50_FPN_1x.yaml",
}
PYTHON_CONFIGS = sorted(
    str(path.relative_to(CONFIGS))
    for path in CONFIGS.rglob("*.py")
    if path.relative_to(CONFIGS).parts[0] != "common"
)


def _yacs(name: str) -> CfgNode:
    return musu.build_config(CONFIGS / name, ["MODEL.DEVICE", "cpu"])


def _lazy(name: str):
    return LazyConfig.load(str(CONFIGS / name))


def test_every_python_config_has_a_yaml_twin_or_is_listed() -> None:
    assert set(TWINS) <= set(PYTHON_CONFIGS)
    for name in TWINS.values():
        assert (CONFIGS / name).is_file(), name


@pytest.mark.parametrize("name", PYTHON_CONFIGS)
def test_every_python_config_loads_and_builds_its_model(name: str) -> None:
    cfg = _lazy(name)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg.keys())
    model = instantiate(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("lazy_name, yaml_name", sorted(TWINS.items()))
def test_same_seed_gives_equal_parameters(lazy_name: str, yaml_name: str) -> None:
    torch.manual_seed(0)
    lazy = instantiate(_lazy(lazy_name).model)
    torch.manual_seed(0)
    yacs = build_model(_yacs(yaml_name))
    assert type(lazy) is type(yacs)
    lazy_state, yacs_state = lazy.state_dict(), yacs.state_dict()
    assert list(lazy_state) == list(yacs_state)
    for key, value in yacs_state.items():
        assert torch.equal(lazy_state[key], value), key
    frozen = {name for name, p in yacs.named_parameters() if not p.requires_grad}
    assert {name for name, p in lazy.named_parameters() if not p.requires_grad} == frozen
    settings = [
        "num_classes", "num_anchors", "strides", "focal_loss_alpha", "focal_loss_gamma", "beta",
        "reg_loss_weight", "test_score_thresh", "test_topk_candidates", "test_nms_thresh",
        "max_detections_per_image", "head_in_features",
    ]  # fmt: skip
    for attribute in settings:
        assert getattr(lazy, attribute) == getattr(yacs, attribute), attribute
    assert repr(lazy.assigner) == repr(yacs.assigner)
    assert lazy.shadow_assigner is None and yacs.shadow_assigner is None


def _batch(cfg: CfgNode, count: int = 2) -> List[Dict]:
    """The first ``count`` images of the config's training data, at its test input size."""
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:count]
    mapper = DatasetMapper(  # training inputs (with instances), without the random flip
        is_train=True,
        augmentations=[T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)],
        image_format=cfg.INPUT.FORMAT,
    )
    return [mapper(copy.deepcopy(record)) for record in records]


@pytest.mark.parametrize(
    "lazy_name, yaml_name",
    [(lazy, yaml) for lazy, yaml in sorted(TWINS.items()) if not lazy.startswith("COCO")],
)
def test_equal_losses_on_one_batch(lazy_name: str, yaml_name: str) -> None:
    yacs_cfg = _yacs(yaml_name)
    torch.manual_seed(0)
    lazy = instantiate(_lazy(lazy_name).model)
    torch.manual_seed(0)
    yacs = build_model(yacs_cfg)
    inputs = _batch(yacs_cfg)
    for model in (lazy, yacs):
        model.train()
    with EventStorage():
        lazy_losses, yacs_losses = lazy(inputs), yacs(inputs)
    assert set(lazy_losses) == set(yacs_losses)
    for key, value in yacs_losses.items():
        assert torch.isfinite(value)
        assert torch.equal(lazy_losses[key], value), key


@pytest.mark.parametrize("lazy_name, yaml_name", sorted(TWINS.items()))
def test_same_optimizer_schedule_and_data(lazy_name: str, yaml_name: str) -> None:
    lazy, yacs = _lazy(lazy_name), _yacs(yaml_name)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    lazy.optimizer.params.model = model
    lazy_optimizer = instantiate(lazy.optimizer)
    yacs_optimizer = build_optimizer(yacs, model)
    for lazy_group, yacs_group in zip(lazy_optimizer.param_groups, yacs_optimizer.param_groups):
        for key in ("lr", "momentum", "weight_decay", "nesterov"):
            assert lazy_group[key] == pytest.approx(yacs_group[key]), key
    assert len(lazy_optimizer.param_groups) == len(yacs_optimizer.param_groups)
    max_iter = yacs.SOLVER.MAX_ITER
    assert lazy.train.max_iter == max_iter
    rates = []  # the learning rate of every iteration, as Detectron2's LRScheduler hook sets it
    for scheduler in (
        LRMultiplier(lazy_optimizer, instantiate(lazy.lr_multiplier), max_iter),
        build_lr_scheduler(yacs, yacs_optimizer),
    ):
        rates.append([])
        for _ in range(max_iter):
            rates[-1].append(scheduler.get_last_lr()[0])
            scheduler.step()
    assert rates[0] == pytest.approx(rates[1], rel=1e-12)
    assert lazy.train.checkpointer.period == yacs.SOLVER.CHECKPOINT_PERIOD
    train, test = lazy.dataloader.train, lazy.dataloader.test
    assert list(train.dataset.names) == list(yacs.DATASETS.TRAIN)
    assert list(test.dataset.names) == list(yacs.DATASETS.TEST)
    assert train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert train.num_workers == yacs.DATALOADER.NUM_WORKERS
    resize, flip = train.mapper.augmentations
    assert tuple(resize.short_edge_length) == tuple(yacs.INPUT.MIN_SIZE_TRAIN)
    assert resize.max_size == yacs.INPUT.MAX_SIZE_TRAIN
    assert flip.horizontal and yacs.INPUT.RANDOM_FLIP == "horizontal"
    (test_resize,) = test.mapper.augmentations
    assert test_resize.short_edge_length == yacs.INPUT.MIN_SIZE_TEST
    assert test_resize.max_size == yacs.INPUT.MAX_SIZE_TEST
    assert lazy.train.init_checkpoint == yacs.MODEL.WEIGHTS
    assert lazy.train.seed == yacs.SEED


def _lazy_tool():
    path = REPO / "tools" / "lazyconfig_train_net.py"
    spec = importlib.util.spec_from_file_location("lazyconfig_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_entry_point_takes_lazyconfig_overrides() -> None:
    tool = _lazy_tool()
    for spelling in (["a=1", "b.c=[2]"], ["--opts", "a=1", "b.c=[2]"]):
        argv = ["--config-file", "c.py", "--resume", *spelling]
        args = parse_tool_args(tool.build_parser(), argv, lazy_config=True)
        assert args.opts == ["a=1", "b.c=[2]"] and args.resume
    with pytest.raises(SystemExit):  # yacs-style pairs are not LazyConfig overrides
        argv = ["--config-file", "c.py", "train.max_iter", "3"]
        parse_tool_args(tool.build_parser(), argv, lazy_config=True)


def test_the_entry_point_trains_resumes_and_evaluates(tmp_path: Path) -> None:
    tool = _lazy_tool()
    splits = {
        split: ensure_split(split, tmp_path / "data", num_images=4, seed=3, image_size=64)
        for split in ("train", "val")
    }
    register = []
    for split, paths in splits.items():
        register += ["--register-coco", f"lazy_tiny_{split}", paths.json_file, paths.image_root]
    output = tmp_path / "run"
    overrides = [
        "dataloader.train.dataset.names=['lazy_tiny_train']",
        "dataloader.test.dataset.names=['lazy_tiny_val']",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", f"train.output_dir='{output}'", "train.device='cpu'",
        "train.checkpointer.period=1", "train.log_period=1",
    ]  # fmt: skip
    config = ["--config-file", str(CONFIGS / "Synthetic" / "musu_R_18_FPN_1200it.py"), *register]

    def run(*argv: str):  # options first: the overrides take every word after them
        argv = [*config, *argv]
        return tool.main(parse_tool_args(tool.build_parser(), argv, lazy_config=True))

    results = run(*overrides, "train.max_iter=2")
    assert {"AP", "AP50"} <= set(results["bbox"])
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    first = torch.load(output / "model_final.pth", weights_only=True)
    assert first["iteration"] == 1
    run("--resume", *overrides, "train.max_iter=3")  # one more iteration from model_final.pth
    resumed = torch.load(output / "model_final.pth", weights_only=True)
    assert resumed["iteration"] == 2
    assert any(not torch.equal(resumed["model"][k], first["model"][k]) for k in first["model"])
    weights = f"train.init_checkpoint='{output / 'model_final.pth'}'"
    evaluated = run("--eval-only", *overrides, weights)
    assert evaluated["bbox"].keys() == results["bbox"].keys()


def test_the_entry_point_refuses_yaml_configs(tmp_path: Path) -> None:
    # Detectron2's LazyConfig.load reads .yaml with yaml.unsafe_load: a tag there could run code.
    marker = tmp_path / "marker"
    config = tmp_path / "config.yaml"
    config.write_text(f"x: !!python/object/apply:os.system ['touch {marker}']\n")
    tool = _lazy_tool()
    args = parse_tool_args(tool.build_parser(), ["--config-file", str(config)], lazy_config=True)
    with pytest.raises(ValueError, match=r"config\.yaml.*Python files \(\.py\)"):
        tool.setup(args)
    assert not marker.exists()


def test_cpu_ddp_takes_detectron2s_fp16_compression_keyword(tmp_path: Path, monkeypatch) -> None:
    """configs/common/train.py's ``train.ddp`` (with ``fp16_compression``) wraps a CPU model (a
    1-process gloo group stands in for several, as in test_reliability_checkpoint.py)."""
    import torch.distributed as dist
    from detectron2.utils import comm

    from musu.engine import create_ddp_model

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        monkeypatch.setattr(comm, "get_world_size", lambda: 2)
        model = torch.nn.Linear(2, 2)
        ddp_settings = dict(_lazy("Synthetic/musu_R_18_FPN_1200it.py").train.ddp)
        for fp16 in (False, True):
            wrapped = create_ddp_model(model, **{**ddp_settings, "fp16_compression": fp16})
            assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
            wrapped(torch.ones(1, 2)).sum().backward()
    finally:
        dist.destroy_process_group()
