#!/usr/bin/env python
"""Side-by-side training-step cost of a focal-loss config and its Rank & Sort counterpart.

Both models get the same weights and the same batches from the config's training loader; steps
alternate (focal, RS, focal, RS, ...) so that both see the same machine load. Prints the median
seconds per step (forward + backward + SGD step) of each, their ratio, and the median time of the
loss call alone.

python projects/RankSort/tools/benchmark_ranksort.py \
    --focal configs/Synthetic/musu_paper_R_18_FPN_1200it.yaml \
    --rs projects/RankSort/configs/Synthetic/musu_rs_R_18_FPN_synthetic.yaml --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import musu
import musu_ranksort  # noqa: F401  (registers the Rank & Sort META_ARCH)


def load_cfg(path: str) -> CfgNode:
    """:func:`musu.build_config` of ``path`` (installed projects' keys included) on CUDA where
    available, else CPU, with the data loaded in the main process."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return musu.build_config(path, ["MODEL.DEVICE", device, "DATALOADER.NUM_WORKERS", "0"])


def timed_losses(model: torch.nn.Module, record: List[float]) -> None:
    """Wrap ``model.losses`` to record its wall time."""
    original = model.losses

    def wrapper(*args, **kwargs) -> Dict[str, torch.Tensor]:
        start = time.perf_counter()
        out = original(*args, **kwargs)
        record.append(time.perf_counter() - start)
        return out

    model.losses = wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--focal", required=True)
    parser.add_argument("--rs", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = {"focal": load_cfg(args.focal), "rs": load_cfg(args.rs)}
    torch.manual_seed(0)
    models = {name: build_model(cfg) for name, cfg in cfgs.items()}
    models["rs"].load_state_dict(models["focal"].state_dict())
    optimizers = {
        name: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        for name, model in models.items()
    }
    step_times: Dict[str, List[float]] = {name: [] for name in models}
    loss_times: Dict[str, List[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.train()
        timed_losses(model, loss_times[name])
    loader = iter(build_detection_train_loader(cfgs["focal"]))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with EventStorage():
        for step in range(args.warmup + args.steps):
            batch = next(loader)
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                losses = model(batch)
                optimizers[name].zero_grad()
                sum(losses.values()).backward()
                optimizers[name].step()
                sync()
                if step >= args.warmup:
                    step_times[name].append(time.perf_counter() - start)
                else:
                    loss_times[name].pop()
    focal, rs = (statistics.median(step_times[k]) for k in ("focal", "rs"))
    focal_loss, rs_loss = (statistics.median(loss_times[k]) for k in ("focal", "rs"))
    print(f"device: {cfgs['focal'].MODEL.DEVICE}, threads: {args.threads}, steps: {args.steps}")
    print(f"median s/step  focal: {focal:.3f}  rs: {rs:.3f}  ratio rs/focal: {rs / focal:.2f}")
    print(f"median s/loss  focal: {focal_loss:.4f}  rs: {rs_loss:.4f}")


if __name__ == "__main__":
    main()
