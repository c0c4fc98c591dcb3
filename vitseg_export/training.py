"""Training and evaluation. Runs unchanged on one CPU, one GPU (AMP), or under
`torchrun --nproc-per-node N` (DistributedDataParallel, DistributedSampler, rank 0 writes).

Optimizer defaults:
- vit: the seed article's Adam lr 4e-4, StepLR x0.8 every 12 epochs.
- segformer: AdamW lr 6e-4 (weight decay 0.01) with a linear warm-up then polynomial decay (power 1),
  the SegFormer paper's recipe. The paper's 6e-5 assumes an ImageNet-pretrained encoder; from random
  weights (no downloads here) 10x that learns in a few epochs, measured on the synthetic set.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from vitseg_export.checkpoint import LoadedCheckpoint, save_checkpoint
from vitseg_export.files import atomic_write_bytes
from vitseg_export.data.sources import IGNORE_INDEX, open_source
from vitseg_export.data.transforms import SegmentationDataset
from vitseg_export.errors import DataError, VitsegError
from vitseg_export.modeling.registry import Segmenter


@dataclass
class TrainSettings:
    data: str = "synthetic"
    epochs: int = 3
    image_size: int | None = None  # None: the architecture's
    batch_size: int = 16
    lr: float | None = None  # None: the family default
    weight_decay: float | None = None
    num_workers: int = 1
    seed: int = 0
    val_data: str | None = None  # None: the validation split of `data`


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_pixel_accuracy: float
    val_miou: float
    val_per_class_iou: list[float]
    seconds: float


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) counts, rows = target, columns = prediction; ignores IGNORE_INDEX."""
    valid = target != IGNORE_INDEX
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: torch.Tensor) -> tuple[float, float, list[float]]:
    """(pixel accuracy, mIoU over classes present in target or prediction, per-class IoU (nan if absent))."""
    cm = cm.double()
    total = cm.sum().item()
    acc = (cm.diag().sum() / total).item() if total else float("nan")
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    present = iou[~torch.isnan(iou)]
    miou = present.mean().item() if present.numel() else float("nan")
    return acc, miou, iou.tolist()


def _dist_info() -> tuple[bool, int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return False, 0, 1, 0


def _optimizer(family: str, params, settings: TrainSettings, steps_per_epoch: int):
    if family == "vit":
        opt = torch.optim.Adam(params, lr=settings.lr or 4e-4, weight_decay=settings.weight_decay or 0.0)
        # StepLR x0.8 every 12 epochs, stepped per iteration for a uniform loop
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.8 ** (it // (12 * steps_per_epoch)))
    else:
        opt = torch.optim.AdamW(params, lr=settings.lr or 6e-4,
                                weight_decay=0.01 if settings.weight_decay is None else settings.weight_decay)
        total = max(1, settings.epochs * steps_per_epoch)
        warmup = min(total // 10, 200)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda it: (it + 1) / warmup if it < warmup else max(0.0, 1 - (it - warmup) / max(1, total - warmup)))
    return opt, sched


@torch.no_grad()
def evaluate(segmenter: nn.Module, loader, num_classes: int, device: torch.device, distributed: bool = False) -> tuple[float, float, list[float]]:
    segmenter.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for images, masks in loader:
        logits = segmenter(images.to(device))
        cm += confusion_matrix(logits.argmax(1), masks.to(device), num_classes)
    if distributed:
        dist.all_reduce(cm)
    return metrics_from_confusion(cm.cpu())


def train(
    start: LoadedCheckpoint,
    settings: TrainSettings,
    output: Path,
    progress: Callable[[str, int, int, dict], None] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> list[EpochMetrics]:
    """Train `start` (random or loaded weights) and write the best (by val mIoU) checkpoint to `output`,
    the last one to `output/last`, and per-epoch metrics to `output/metrics.json`. `after_step(net)` runs
    after every optimizer step (e.g. to keep 2:4 sparsity masks applied)."""
    distributed, rank, world, local_rank = _dist_info()
    torch.manual_seed(settings.seed)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    meta = start.meta
    size = settings.image_size or meta.image_size[0]
    if meta.family == "vit" and size != meta.config.image_size:
        raise VitsegError(f"{meta.architecture} is built for {meta.config.image_size}px input, not {size}px",
                          "the ViT's position embedding fixes the grid: drop --image-size or pick the model's size")
    meta.image_size = (size, size)

    train_source = open_source(settings.data, "train", settings.seed)
    val_source = open_source(settings.val_data or settings.data, "val", settings.seed)
    if len(train_source.class_names) != meta.config.num_classes:
        raise DataError(f"{settings.data} has {len(train_source.class_names)} classes, the model {meta.config.num_classes}",
                        "train a model with a matching class count (or fix classes.txt)")
    meta.class_names = list(train_source.class_names)
    train_set = SegmentationDataset(train_source, (size, size), train=True)
    val_set = SegmentationDataset(val_source, (size, size), train=False)
    if len(train_set) < world:
        raise DataError(f"{settings.data} has {len(train_set)} training images for {world} processes", "add data")
    train_sampler = DistributedSampler(train_set, shuffle=True, seed=settings.seed) if distributed else None
    val_sampler = DistributedSampler(val_set, shuffle=False) if distributed else None
    loader_kw = dict(num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0,
                     pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, settings.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                              drop_last=len(train_set) >= settings.batch_size * world, **loader_kw)
    val_loader = DataLoader(val_set, settings.batch_size, sampler=val_sampler, **loader_kw)

    segmenter = Segmenter(start.model, meta.mean, meta.std).to(device)
    model: nn.Module = segmenter
    if distributed:
        model = nn.parallel.DistributedDataParallel(segmenter, device_ids=[local_rank] if device.type == "cuda" else None)
    opt, sched = _optimizer(meta.family, model.parameters(), settings, len(train_loader))
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    history: list[EpochMetrics] = []
    best = -1.0
    meta.training = {**meta.training, "data": settings.data, "epochs": settings.epochs, "image_size": size,
                     "batch_size": settings.batch_size, "world_size": world, "device": device.type,
                     "amp": str(amp_dtype).replace("torch.", "") if use_amp else None}
    for epoch in range(1, settings.epochs + 1):
        t0 = time.perf_counter()
        if train_sampler is not None:
            train_sampler.set_epoch(epoch)
        model.train()
        loss_sum, batches = 0.0, 0
        for step, (images, masks) in enumerate(train_loader):
            images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext():
                loss = F.cross_entropy(model(images), masks, ignore_index=IGNORE_INDEX)
            if not math.isfinite(loss.item()):
                raise VitsegError(f"training diverged at epoch {epoch} step {step} (loss {loss.item()})",
                                  "lower --lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            if after_step is not None:
                after_step(segmenter.net)
            loss_sum += loss.item()
            batches += 1
            if progress and rank == 0:
                progress("train", step + 1, len(train_loader), {"epoch": epoch, "loss": loss_sum / batches})
        acc, miou, per_class = evaluate(segmenter, val_loader, meta.config.num_classes, device, distributed)
        m = EpochMetrics(epoch, loss_sum / max(1, batches), acc, miou, per_class, time.perf_counter() - t0)
        history.append(m)
        if rank == 0:
            record = {**meta.training, "epoch": epoch, "val_pixel_accuracy": acc, "val_miou": miou}
            if miou > best:
                best = miou
                meta.training = {**record, "checkpoint": "best"}
                save_checkpoint(segmenter.net, meta, output)
            meta.training = {**record, "checkpoint": "last"}
            save_checkpoint(segmenter.net, meta, output / "last")
            metrics = {"architecture": meta.architecture, "class_names": meta.class_names,
                       "epochs": [m.__dict__ for m in history], "best_val_miou": best}
            atomic_write_bytes(output / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
            if progress:
                progress("epoch", epoch, settings.epochs, m.__dict__)
    if distributed:
        dist.barrier()
    return history
