"""Training and evaluation. Runs unchanged on one CPU, one GPU (AMP), or under
`torchrun --nproc-per-node N` (DistributedDataParallel, DistributedSampler, rank 0 writes).

Optimizer defaults come from the family's `TrainingRecipe` (the ViT: the seed article's Adam lr 4e-4,
StepLR x0.8 every 12 epochs; SegFormer: AdamW with linear warm-up then polynomial decay).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from vitseg_export.checkpoint import (
    CheckpointMeta,
    LoadedCheckpoint,
    init_from_foreign,
    load_checkpoint,
    save_checkpoint,
)
from vitseg_export.compare.metrics import class_ious, confusion, miou, pixel_accuracy
from vitseg_export.data.sources import IGNORE_INDEX, open_source
from vitseg_export.data.transforms import SegmentationDataset
from vitseg_export.errors import DataError, VitsegError
from vitseg_export.files import write_json
from vitseg_export.modeling import registry
from vitseg_export.modeling.registry import Segmenter, TrainingRecipe
from vitseg_export.progress import Progress


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


def dist_info() -> tuple[bool, int, int, int]:
    """(distributed, rank, world size, local rank); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return False, 0, 1, 0


def build_optimizer(recipe: TrainingRecipe, params, settings: TrainSettings, steps_per_epoch: int):
    """(optimizer, per-iteration LambdaLR scheduler) for a family's recipe; settings.lr/weight_decay override."""
    lr = settings.lr or recipe.lr
    wd = recipe.weight_decay if settings.weight_decay is None else settings.weight_decay
    opt_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[recipe.optimizer]
    opt = opt_class(params, lr=lr, weight_decay=wd)
    if recipe.schedule == "step":  # x gamma every step_epochs epochs, stepped per iteration for a uniform loop
        every = recipe.step_epochs * steps_per_epoch
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: recipe.step_gamma ** (it // every))
    total = max(1, settings.epochs * steps_per_epoch)
    warmup = min(total // 10, 200)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda it: (it + 1) / warmup if it < warmup else max(0.0, 1 - (it - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(segmenter: nn.Module, loader, num_classes: int, device: torch.device, distributed: bool = False) -> tuple[float, float, list[float]]:
    """(pixel accuracy, mIoU, per-class IoU) of `segmenter` over `loader`, all-reduced under DDP."""
    segmenter.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for images, masks in loader:
        logits = segmenter(images.to(device))
        cm += confusion(logits.argmax(1).cpu().numpy(), masks.numpy(), num_classes, ignore=IGNORE_INDEX)
    if distributed:
        total = torch.from_numpy(cm).to(device)
        dist.all_reduce(total)
        cm = total.cpu().numpy()
    return pixel_accuracy(cm), miou(cm), class_ious(cm).tolist()


@dataclass
class _Run:
    """What one training run works with (built by `_prepare`)."""

    meta: CheckpointMeta
    segmenter: Segmenter
    model: nn.Module  # the segmenter, or its DDP wrapper
    train_loader: DataLoader
    val_loader: DataLoader
    train_sampler: DistributedSampler | None
    device: torch.device
    distributed: bool
    rank: int


def training_device(local_rank: int) -> torch.device:
    """This process's GPU where there is one (under torchrun: its local rank's), else the CPU."""
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _loaders(meta: CheckpointMeta, settings: TrainSettings, size: int, world: int, distributed: bool, cuda: bool):
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
    kw = dict(num_workers=settings.num_workers, persistent_workers=settings.num_workers > 0, pin_memory=cuda)
    train_loader = DataLoader(train_set, settings.batch_size, shuffle=train_sampler is None, sampler=train_sampler,
                              drop_last=len(train_set) >= settings.batch_size * world, **kw)
    return train_loader, DataLoader(val_set, settings.batch_size, sampler=val_sampler, **kw), train_sampler


def _prepare(start: LoadedCheckpoint, settings: TrainSettings) -> _Run:
    distributed, rank, world, local_rank = dist_info()
    device = training_device(local_rank)
    meta = copy.deepcopy(start.meta)  # the caller's checkpoint is left as it was
    size = settings.image_size or meta.image_size[0]
    fixed = registry.get_family(meta.family).fixed_input_size(meta.config)
    if fixed is not None and size != fixed:
        raise VitsegError(f"{meta.architecture} is built for {fixed}px input, not {size}px",
                          "its position embedding fixes the grid: drop --image-size or pick the model's size")
    meta.image_size = (size, size)
    train_loader, val_loader, train_sampler = _loaders(meta, settings, size, world, distributed, device.type == "cuda")
    segmenter = Segmenter(start.model, meta.mean, meta.std).to(device)
    model: nn.Module = segmenter
    if distributed:
        model = nn.parallel.DistributedDataParallel(segmenter, device_ids=[local_rank] if device.type == "cuda" else None)
    return _Run(meta, segmenter, model, train_loader, val_loader, train_sampler, device, distributed, rank)


def _train_epoch(run: _Run, epoch: int, opt, sched, scaler, amp_dtype, progress, after_step) -> float:
    """One pass over the training set; returns the mean loss."""
    use_amp = run.device.type == "cuda"
    if run.train_sampler is not None:
        run.train_sampler.set_epoch(epoch)
    run.model.train()
    loss_sum, batches = 0.0, 0
    for step, (images, masks) in enumerate(run.train_loader):
        images, masks = images.to(run.device, non_blocking=True), masks.to(run.device, non_blocking=True)
        with torch.autocast("cuda", dtype=amp_dtype) if use_amp else nullcontext():
            loss = F.cross_entropy(run.model(images), masks, ignore_index=IGNORE_INDEX)
        if not math.isfinite(loss.item()):
            raise VitsegError(f"training diverged at epoch {epoch} step {step} (loss {loss.item()})", "lower --lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        if after_step is not None:
            after_step(run.segmenter.net)
        loss_sum += loss.item()
        batches += 1
        if progress and run.rank == 0:
            progress("train", step + 1, len(run.train_loader), epoch=epoch, loss=loss_sum / batches)
    return loss_sum / max(1, batches)


def _save_epoch(run: _Run, output: Path, history: list[EpochMetrics], best: float) -> float:
    """Rank 0: best checkpoint (by val mIoU; an undefined mIoU ranks lowest, and the first epoch is always
    saved), last checkpoint and metrics.json (strict JSON: undefined values are null). Returns the new best."""
    m = history[-1]
    record = {**run.meta.training, "epoch": m.epoch, "val_pixel_accuracy": m.val_pixel_accuracy, "val_miou": m.val_miou}
    if len(history) == 1 or score_of(m) > best:
        best = score_of(m)
        run.meta.training = {**record, "checkpoint": "best"}
        save_checkpoint(run.segmenter.net, run.meta, output)
    run.meta.training = {**record, "checkpoint": "last"}
    save_checkpoint(run.segmenter.net, run.meta, output / "last")
    metrics = {"architecture": run.meta.architecture, "class_names": run.meta.class_names,
               "epochs": [e.__dict__ for e in history], "best_val_miou": best}
    write_json(output / "metrics.json", metrics)
    return best


def score_of(metrics: EpochMetrics) -> float:
    """An epoch's validation mIoU for ranking; -inf when undefined (no labelled validation pixels)."""
    return metrics.val_miou if math.isfinite(metrics.val_miou) else float("-inf")


def train(
    start: LoadedCheckpoint,
    settings: TrainSettings,
    output: Path,
    progress: Progress | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
) -> list[EpochMetrics]:
    """Train `start` (random or loaded weights; its network is trained in place, its meta is not touched)
    and write the best (by val mIoU) checkpoint to `output`, the last one to `output/last`, and per-epoch
    metrics to `output/metrics.json`. `after_step(net)` runs after every optimizer step (e.g. to keep 2:4
    sparsity masks applied). Returns the per-epoch metrics; raises DataError/VitsegError for bad data,
    sizes or a diverging loss. The caller's torch RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(settings.seed)
        run = _prepare(start, settings)
        recipe = registry.get_family(run.meta.family).recipe
        opt, sched = build_optimizer(recipe, run.model.parameters(), settings, len(run.train_loader))
        use_amp = run.device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        world = dist.get_world_size() if run.distributed else 1
        run.meta.training = {**run.meta.training, "data": settings.data, "epochs": settings.epochs,
                             "image_size": run.meta.image_size[0], "batch_size": settings.batch_size, "world_size": world,
                             "device": run.device.type, "amp": str(amp_dtype).replace("torch.", "") if use_amp else None}
        history: list[EpochMetrics] = []
        best = float("-inf")
        for epoch in range(1, settings.epochs + 1):
            t0 = time.perf_counter()
            loss = _train_epoch(run, epoch, opt, sched, scaler, amp_dtype, progress, after_step)
            acc, miou, per_class = evaluate(run.segmenter, run.val_loader, run.meta.config.num_classes, run.device,
                                            run.distributed)
            history.append(EpochMetrics(epoch, loss, acc, miou, per_class, time.perf_counter() - t0))
            if run.rank == 0:
                best = _save_epoch(run, output, history, best)
                if progress:
                    progress("epoch", epoch, settings.epochs, **history[-1].__dict__)
        if run.distributed:
            dist.barrier()
    return history


def training_start(model: str | None, init: str | None, data: str, seed: int = 0,
                   revision: str | None = None) -> LoadedCheckpoint:
    """What `vitseg train` starts from: an architecture with random weights (`model`), a vitseg / Hugging
    Face checkpoint or Hub id (`init`, at `revision`), or foreign weights (`init` a bare weights file, `model` saying what to
    build). The classifier follows the data's class count (re-initialized, with a warning, when it differs).
    Raises VitsegError/CheckpointError for what cannot be started from."""

    if model is None and init is None:
        raise VitsegError("nothing to train", "pass --model ARCH (see `vitseg models`) or --init CHECKPOINT")
    if revision is not None and init is None:
        raise VitsegError("--revision applies to --init (a Hub id)", "drop --revision, or pass --init ORG/NAME")
    sources = {split: open_source(data, split, seed) for split in ("train", "val")}  # checked before anything is built
    if any(source.max_label is None for source in sources.values()):
        raise DataError(f"{data} has no masks", "training needs labels: add DIR/masks/<image stem>.png")
    num_classes = len(sources["train"].class_names)
    if init is None:
        arch = registry.get_architecture(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = registry.build_model(arch.family, registry.replace_classes(arch.config, num_classes))
        return LoadedCheckpoint(net, CheckpointMeta.for_architecture(arch, num_classes), model, None, "random")
    init_path = Path(init)
    if init_path.is_file() and not (init_path.parent / "config.json").is_file() and revision is None:
        if model is None:
            raise VitsegError(f"{init} holds bare weights", "also pass --model ARCH to say what to build")
        start = init_from_foreign(registry.get_architecture(model), init_path, num_classes)
    else:
        start = load_checkpoint(init, revision=revision)
        if model is not None and registry.get_architecture(model).family != start.meta.family:
            raise VitsegError(f"--init is a {start.meta.family} checkpoint but --model {model} is not",
                              "drop --model or pick a matching architecture")
        if start.meta.config.num_classes != num_classes:
            warnings.warn(f"{init} predicts {start.meta.config.num_classes} classes, {data} has {num_classes}: "
                          "the classifier is re-initialized", stacklevel=2)
            registry.get_family(start.meta.family).reset_classifier(start.model, num_classes)
            start.meta.config = start.model.config
    start.meta.training = {**start.meta.training, "init": init}
    return start
