"""Mixed precision: under autocast the network runs in low precision, assignment and losses in
float32, and a few training iterations stay finite; the precision rule of ``musu.engine.amp``
(bfloat16 on CPUs with native bfloat16, float32 elsewhere unless forced), its CPU training loop,
channels-last, and ``train_net.py`` training / evaluating in bfloat16 and float32.

The CPU detection is forced either way with ``MUSU_CPU_NATIVE_BF16``, so every branch runs on
any CPU (emulated bfloat16 is slow but exact enough for these checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import musu
from musu.data import register_synthetic_split
from musu.engine import AtomicCheckpointer, amp

import train_net  # the root script (conftest.py puts the root on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]

SYNTHETIC_CONFIG = REPO_ROOT / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
from musu.modeling.assigners import MuSuAssigner

TRAIN_NAME, VAL_NAME = "amp_synthetic_train", "amp_synthetic_val"


def _tiny_model(num_anchors: int):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file("configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MUSU.NUM_ANCHORS = num_anchors
    torch.manual_seed(0)
    return build_model(cfg)


def _batch(size: int = 128):
    generator = torch.Generator().manual_seed(1)
    batch = []
    for num_objects in (3, 0):
        instances = Instances((size, size))
        corner = torch.rand(num_objects, 2, generator=generator) * size * 0.6
        extent = torch.rand(num_objects, 2, generator=generator) * size * 0.3 + 10
        instances.gt_boxes = Boxes(torch.cat([corner, corner + extent], dim=1))
        instances.gt_classes = torch.randint(0, 5, (num_objects,), generator=generator)
        image = torch.randint(0, 256, (3, size, size), generator=generator).float()
        batch.append({"image": image, "instances": instances})
    return batch


@pytest.mark.parametrize("num_anchors", [1, 3])
def test_autocast_training_is_finite_with_float32_assignment(num_anchors, monkeypatch) -> None:
    model = _tiny_model(num_anchors)
    model.train()
    seen_dtypes = []
    original_call = MuSuAssigner.__call__

    def spy(self, points, scores, pred_boxes, *args, **kwargs):
        seen_dtypes.append((scores.dtype, pred_boxes.dtype, torch.is_autocast_enabled("cpu")))
        return original_call(self, points, scores, pred_boxes, *args, **kwargs)

    monkeypatch.setattr(MuSuAssigner, "__call__", spy)
    head_dtypes = []
    model.head.cls_score.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batch = _batch()
    with EventStorage():
        for _ in range(3):
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                losses = model(batch)
            for name, value in losses.items():
                assert value.dtype == torch.float32, name
                assert torch.isfinite(value), name
            optimizer.zero_grad()
            sum(losses.values()).backward()
            for name, parameter in model.named_parameters():
                if parameter.grad is not None:
                    assert torch.isfinite(parameter.grad).all(), name
            optimizer.step()
    assert head_dtypes and all(dtype == torch.bfloat16 for dtype in head_dtypes)  # autocast on
    assert seen_dtypes and all(
        s == torch.float32 and b == torch.float32 and not on for s, b, on in seen_dtypes
    )


# --- musu.engine.amp: the precision rule, the CPU training loop, train_net end to end ---------


def _amp_cfg(device: str = "cpu", **keys):
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.MODEL.DEVICE = device
    cfg.SOLVER.AMP.ENABLED = keys.pop("enabled", True)
    cfg.TEST.AMP.ENABLED = keys.pop("test_enabled", False)
    cfg.SOLVER.AMP.CPU_BFLOAT16 = keys.pop("cpu_bfloat16", "native")
    cfg.SOLVER.AMP.PRECISION = keys.pop("precision", "float16")
    assert not keys, keys
    return cfg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16 amx_int8\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),  # Arm
        ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw\n", False),
        ("processor\t: 0\n", False),
    ],
)
def test_native_bf16_detection_reads_cpu_flags(text, expected, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(amp.ENV_NATIVE_BF16, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert amp.cpu_has_native_bf16(str(cpuinfo)) is expected
    assert amp.cpu_has_native_bf16(str(tmp_path / "missing")) is False


def test_native_bf16_detection_can_be_forced_either_way(tmp_path, monkeypatch) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx2\n")
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "1")
    assert amp.cpu_has_native_bf16(str(cpuinfo)) is True
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "0")
    cpuinfo.write_text("flags\t\t: avx512_bf16\n")
    assert amp.cpu_has_native_bf16(str(cpuinfo)) is False
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "yes")
    with pytest.raises(ValueError, match="MUSU_CPU_NATIVE_BF16 must be 0 or 1"):
        amp.cpu_has_native_bf16()


def test_precision_rule(monkeypatch) -> None:
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "1")
    assert amp.resolve_autocast(_amp_cfg(), training=True).dtype == torch.bfloat16
    assert amp.resolve_autocast(_amp_cfg(enabled=False), training=True).dtype is None
    assert amp.resolve_autocast(_amp_cfg(), training=False).dtype is None  # TEST.AMP off
    assert amp.resolve_autocast(_amp_cfg(test_enabled=True), training=False).dtype == torch.bfloat16

    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "0")
    fallback = amp.resolve_autocast(_amp_cfg(), training=True)
    assert fallback.dtype is None and "no native bfloat16" in fallback.reason
    forced = amp.resolve_autocast(_amp_cfg(cpu_bfloat16="always"), training=True)
    assert forced.dtype == torch.bfloat16 and forced.device_type == "cpu"

    # CUDA follows SOLVER.AMP.PRECISION, whatever the CPU has (no CUDA call is made).
    for precision in ("float16", "bfloat16"):
        cuda = amp.resolve_autocast(_amp_cfg("cuda", precision=precision), training=True)
        assert cuda.device_type == "cuda" and cuda.dtype == getattr(torch, precision)


@pytest.mark.parametrize(
    "key, value", [("SOLVER.AMP.CPU_BFLOAT16", "sometimes"), ("SOLVER.AMP.PRECISION", "int8")]
)
def test_invalid_precision_keys_fail_naming_the_key(key, value) -> None:
    cfg = _amp_cfg("cuda" if key == "SOLVER.AMP.PRECISION" else "cpu")  # where the key is read
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        musu.validate_musu_config(cfg)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        amp.resolve_autocast(cfg, training=True)


def test_train_loop_follows_the_rule(monkeypatch) -> None:
    model = _tiny_model(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "1")
    loop = amp.build_train_loop(_amp_cfg(), model, [], optimizer)
    assert isinstance(loop, amp.CPUAutocastTrainer) and loop.setting.dtype == torch.bfloat16
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "0")
    loop = amp.build_train_loop(_amp_cfg(), model, [], optimizer)
    assert type(loop) is SimpleTrainer
    loop = amp.build_train_loop(_amp_cfg(enabled=False), model, [], optimizer)
    assert type(loop) is SimpleTrainer


def test_cpu_autocast_trainer_steps_in_bfloat16_and_keeps_float32_weights(monkeypatch) -> None:
    model = _tiny_model(1)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    setting = amp.Autocast("cpu", torch.bfloat16, "test")
    loop = amp.CPUAutocastTrainer(model, iter([_batch()] * 3), optimizer, setting=setting)
    head_dtypes = []
    model.head.cls_score.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with EventStorage() as storage:
        for step in range(3):
            storage.iter = loop.iter = step
            loop.run_step()
        losses = storage.latest()
    assert len(head_dtypes) == 3 * len(model.head_in_features)  # one output per level and step
    assert set(head_dtypes) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")  # the context ends with the forward
    assert all(torch.isfinite(torch.tensor(value)) for value, _ in losses.values())
    for name, parameter in model.named_parameters():
        assert parameter.dtype == torch.float32, name
        assert torch.isfinite(parameter).all(), name
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "the optimizer step did not run"


def test_channels_last_model_gives_the_same_losses() -> None:
    cfg = _amp_cfg(enabled=False)
    cfg.merge_from_file("configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml")
    batch = _batch()
    results = []
    for channels_last in (False, True):
        cfg.MODEL.CHANNELS_LAST = channels_last
        torch.manual_seed(0)
        model = amp.apply_memory_format(build_model(cfg), cfg)
        conv = model.head.cls_score.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) is channels_last
        with EventStorage():
            model.train()
            results.append({k: v.item() for k, v in model(batch).items()})
    for name, value in results[0].items():
        assert results[1][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def _train_net_args(output_dir, *opts, eval_only=False):
    argv = ["--config-file", str(SYNTHETIC_CONFIG)] + (["--eval-only"] if eval_only else [])
    argv += [
        "OUTPUT_DIR", str(output_dir),
        "DATASETS.TRAIN", f"('{TRAIN_NAME}',)",
        "DATASETS.TEST", f"('{VAL_NAME}',)",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "4",
        "SOLVER.WARMUP_ITERS", "2",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "INPUT.MIN_SIZE_TRAIN", "(96,)",
        "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "96",
        *opts,
    ]  # fmt: skip
    return default_argument_parser().parse_args(argv)


@pytest.fixture(scope="module")
def amp_datasets(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("synthetic_amp")
    for name, split, count, seed in [(TRAIN_NAME, "train", 4, 21), (VAL_NAME, "val", 3, 22)]:
        register_synthetic_split(name, root, split, num_images=count, seed=seed, image_size=96)


def _evaluate_with_dtype_spy(output_dir, weights, *opts):
    """--eval-only through train_net's Trainer.test; returns (bbox results, head output dtypes)."""
    cfg = train_net.setup(_train_net_args(output_dir, "MODEL.WEIGHTS", str(weights), *opts))
    model = train_net.Trainer.build_model(cfg)
    AtomicCheckpointer(model).load(str(weights))
    dtypes = []
    model.head.cls_score.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    return train_net.Trainer.test(cfg, model)["bbox"], set(dtypes)


@pytest.mark.slow
def test_train_net_trains_in_bf16_and_evaluates_in_float32_and_back(
    amp_datasets: None, tmp_path, monkeypatch
) -> None:
    # A CPU with native bfloat16 (forced): bfloat16 training, channels-last weights.
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "1")
    args = _train_net_args(
        tmp_path / "bf16", "SOLVER.AMP.ENABLED", "True", "MODEL.CHANNELS_LAST", "True"
    )
    cfg = train_net.setup(args)
    trainer = train_net.Trainer(cfg)
    assert isinstance(trainer._trainer, amp.CPUAutocastTrainer)
    assert trainer._trainer.setting.dtype == torch.bfloat16
    assert trainer.model.head.cls_score.weight.is_contiguous(memory_format=torch.channels_last)
    trainer.train()
    trained = trainer._last_eval_results["bbox"]
    assert all(0.0 <= trained[k] <= 100.0 for k in ("AP", "AP50", "AP75")), trained
    weights = tmp_path / "bf16" / "model_final.pth"
    saved = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert {tensor.dtype for tensor in saved.values() if tensor.is_floating_point()} == {
        torch.float32
    }

    # The bfloat16-trained checkpoint evaluates in float32 (default) and in bfloat16.
    in_float32, dtypes = _evaluate_with_dtype_spy(tmp_path / "e32", weights)
    assert dtypes == {torch.float32}
    in_bf16, dtypes = _evaluate_with_dtype_spy(
        tmp_path / "e16", weights, "TEST.AMP.ENABLED", "True"
    )
    assert dtypes == {torch.bfloat16}
    for bbox in (in_float32, in_bf16):
        assert all(0.0 <= bbox[k] <= 100.0 for k in ("AP", "AP50", "AP75")), bbox

    # A CPU without native bfloat16 (forced): the same config trains in float32, and its
    # checkpoint evaluates in bfloat16 where forced with SOLVER.AMP.CPU_BFLOAT16 "always".
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "0")
    cfg = train_net.setup(_train_net_args(tmp_path / "fp32", "SOLVER.AMP.ENABLED", "True"))
    trainer = train_net.Trainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer
    trainer.train()
    _, dtypes = _evaluate_with_dtype_spy(
        tmp_path / "e16b",
        tmp_path / "fp32" / "model_final.pth",
        "TEST.AMP.ENABLED", "True",
        "SOLVER.AMP.CPU_BFLOAT16", "always",
    )  # fmt: skip
    assert dtypes == {torch.bfloat16}


def test_d2fcos_trains_under_bf16_autocast_with_float32_losses() -> None:
    cfg = _amp_cfg(enabled=False)
    cfg.merge_from_file("configs/Synthetic/fcos_R_18_FPN_1200it.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with EventStorage():
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            losses = model(_batch())
        sum(losses.values()).backward()
    for name, value in losses.items():
        assert value.dtype == torch.float32 and torch.isfinite(value), name
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_train_net_logs_the_precision_and_why(amp_datasets: None, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(amp.ENV_NATIVE_BF16, "0")
    train_net.Trainer(
        train_net.setup(_train_net_args(tmp_path / "log", "SOLVER.AMP.ENABLED", "True"))
    )
    log = (tmp_path / "log" / "log.txt").read_text()
    assert "Training precision: torch.float32" in log and "no native bfloat16" in log
