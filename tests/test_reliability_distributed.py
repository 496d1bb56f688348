"""Two processes give the same losses and gradients as one process on the same two images.

Detectron2's ``launch`` supports CPU: without CUDA each worker calls
``init_process_group("GLOO")`` and sets up ``comm``'s local process group, so this test uses it
unchanged (CUDA is hidden from the workers so that they pick gloo on any machine). Each of the 2
workers takes one image, wraps the MuSu model in ``DistributedDataParallel`` (CPU module: no
``device_ids``) and runs one forward/backward. The backbone uses GroupNorm, so no statistic
differs between processes. (Detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``,
which DDP rejects for CPU modules: ``DefaultTrainer`` itself cannot run multi-process on CPU.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import launch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import EventStorage
from torch.nn.parallel import DistributedDataParallel

import musu
from musu.modeling import meta_arch

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CONFIG = REPO / "configs" / "Synthetic" / "musu_paper_R_18_FPN_1200it.yaml"
WORLD_SIZE = 2


def make_cfg() -> CfgNode:
    """The synthetic config (R-18, 5 classes) with GroupNorm in the backbone, 64 px, CPU."""
    cfg = get_cfg()
    musu.add_musu_config(cfg)
    cfg.merge_from_file(str(SYNTHETIC_CONFIG))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RESNETS.NORM", "GN"])
    return cfg


def make_batch() -> List[Dict[str, Any]]:
    """Two 64 x 64 images with different objects (same size: same padding in every process)."""
    generator = torch.Generator().manual_seed(7)
    specs = [
        ([[4.0, 6.0, 40.0, 44.0], [30.0, 28.0, 62.0, 60.0]], [0, 3]),
        ([[10.0, 2.0, 30.0, 50.0], [36.0, 8.0, 60.0, 30.0], [2.0, 40.0, 50.0, 62.0]], [1, 4, 2]),
    ]
    batch = []
    for boxes, classes in specs:
        instances = Instances(
            (64, 64), gt_boxes=Boxes(torch.tensor(boxes)), gt_classes=torch.tensor(classes)
        )
        image = torch.rand(3, 64, 64, generator=generator) * 255
        batch.append({"image": image, "instances": instances, "height": 64, "width": 64})
    return batch


def build() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(make_cfg())
    model.train()
    return model


def step(model: torch.nn.Module, batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One forward/backward; the normalizers the meta-arch computed, losses and gradients."""
    normalizers: List[float] = []
    reduce = meta_arch._reduce_mean_normalizer

    def recording(total: torch.Tensor) -> torch.Tensor:
        result = reduce(total)
        normalizers.append(float(result))
        return result

    meta_arch._reduce_mean_normalizer = recording
    try:
        with EventStorage():
            losses = model(batch)
        sum(losses.values()).backward()
    finally:
        meta_arch._reduce_mean_normalizer = reduce
    named = (
        model.module.named_parameters() if hasattr(model, "module") else model.named_parameters()
    )
    return {
        "losses": {k: float(v.detach()) for k, v in losses.items()},
        "normalizers": normalizers,  # [cls, reg]
        "grads": {n: p.grad.clone() for n, p in named if p.grad is not None},
    }


def _worker(output_dir: str) -> None:
    """Run by each process of ``launch``: one image per rank, DDP on CPU (gloo)."""
    torch.set_num_threads(1)
    rank = comm.get_rank()
    model = DistributedDataParallel(build(), broadcast_buffers=False)
    result = step(model, make_batch()[rank : rank + 1])
    result.update(world_size=comm.get_world_size(), backend=str(dist.get_backend()))
    torch.save(result, Path(output_dir) / f"rank{rank}.pt")


def test_two_processes_match_one_process(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # workers choose gloo even on a GPU host
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    launch(_worker, WORLD_SIZE, dist_url="auto", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    assert [r["world_size"] for r in ranks] == [WORLD_SIZE] * WORLD_SIZE
    assert {r["backend"] for r in ranks} == {"gloo"}

    single = step(build(), make_batch())

    # Normalizers: all-reduced sum / world size, identical on both ranks; times the world size
    # it is the single-process normalizer (sum of the weights of both images).
    assert ranks[0]["normalizers"] == pytest.approx(ranks[1]["normalizers"], rel=1e-6)
    for distributed, one in zip(ranks[0]["normalizers"], single["normalizers"]):
        assert distributed * WORLD_SIZE == pytest.approx(one, rel=1e-5)
        assert one > WORLD_SIZE  # not the clamp(min=1) branch

    # Losses: the mean of the per-rank losses is the single-process loss.
    for key, value in single["losses"].items():
        mean = sum(r["losses"][key] for r in ranks) / WORLD_SIZE
        assert mean == pytest.approx(value, rel=1e-5), key
        assert ranks[0]["losses"][key] != pytest.approx(ranks[1]["losses"][key], rel=1e-3)

    # Gradients: DDP's average equals the single-process gradient, on every rank.
    assert set(ranks[0]["grads"]) == set(single["grads"]) and len(single["grads"]) > 50
    for name, grad in single["grads"].items():
        scale = float(grad.abs().max()) + 1e-12
        for r in ranks:
            assert torch.equal(r["grads"][name], ranks[0]["grads"][name]), name
            error = float((r["grads"][name] - grad).abs().max())
            assert error <= 1e-5 * scale + 1e-9, (name, error, scale)  # measured: <= 2.4e-6 * scale
