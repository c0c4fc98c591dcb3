"""optimized nn.Module -> fake-quantized nn.Module, fine-tuned: the PyTorch half of quantization-aware training.

The exporters (export/qat_openvino.py with NNCF, export/qat_onnx.py with NVIDIA Model Optimizer) put fake
quantizers into the folded model at the places and ranges their PTQ would choose; this module fine-tunes that
model and judges it. It learns from the fp32 model it was made from (distillation: the KL divergence of the
per-pixel class distributions), not from labels, because every int8 verdict is agreement with the fp32
model: training on labels moved a tiny twin's masks to 79% agreement with its fp32 model in 30 steps (the fp32
model itself, trained the same way, moved as far), where matching the fp32 model is the point. Labels, where
the data has them, only score mIoU.

The model stays in eval mode while it learns (dropout and drop-path off, norms frozen): it is trained as it
will be exported. Runs under `torchrun` like `vitseg train` (DistributedDataParallel, a DistributedSampler,
rank 0 goes on to export).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from vitseg_export.compare.inputs import InputSet
from vitseg_export.compare.metrics import confusion, miou
from vitseg_export.data.sources import open_source
from vitseg_export.data.transforms import SegmentationDataset
from vitseg_export.errors import DataError, VitsegError
from vitseg_export.progress import Progress
from vitseg_export.settings import QatSettings
from vitseg_export.train.training import dist_info, training_device


# (epoch, step, steps per epoch, running mean loss) after every optimizer step, on rank 0
def calibration_batches(inputs: InputSet, batch_size: int = 8) -> list[torch.Tensor]:
    """The calibration images as (N, 3, H, W) float tensors in [0, 1], what the quantizers calibrate on."""
    pixels = np.stack([im.pixels for im in inputs.images])
    return [torch.from_numpy(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the per-pixel class distributions, averaged over pixels."""
    return F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True, reduction="none").sum(1).mean()


def _loader(settings: QatSettings, size: tuple[int, int], distributed: bool, world: int) -> tuple[DataLoader, DistributedSampler | None]:
    source = open_source(settings.data, "train", settings.seed)
    dataset = SegmentationDataset(source, size, train=True)
    if len(dataset) < world:
        raise DataError(f"{settings.data} has {len(dataset)} training images for {world} processes", "add data")
    sampler = DistributedSampler(dataset, shuffle=True, seed=settings.seed) if distributed else None
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, settings.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                        drop_last=len(dataset) >= settings.batch_size * world, num_workers=settings.num_workers,
                        persistent_workers=settings.num_workers > 0)
    return loader, sampler


def finetune(student: nn.Module, teacher: nn.Module, settings: QatSettings, size: tuple[int, int],
             on_step: Progress | None = None) -> dict:
    """Fine-tune the fake-quantized `student` (in place) to compute what the fp32 `teacher` does, for
    `settings.epochs` passes over the training split of `settings.data`. Returns the record of the run (steps,
    losses, seconds); both models are on the CPU again afterwards. VitsegError when the loss diverges."""
    distributed, rank, world, local_rank = dist_info()
    device = training_device(local_rank)
    loader, sampler = _loader(settings, size, distributed, world)
    student.to(device).eval()  # trained as it is exported: no dropout, frozen norms
    teacher.to(device).eval()
    model: nn.Module = student
    if distributed:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=settings.lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for epoch in range(1, settings.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            epoch_losses: list[float] = []
            for step, (images, _) in enumerate(loader, 1):
                images = images.to(device, non_blocking=True)
                with torch.no_grad():
                    target = teacher(images)
                loss = distillation_loss(model(images), target)
                if not math.isfinite(loss.item()):
                    raise VitsegError(f"quantization-aware training diverged at epoch {epoch} step {step} "
                                      f"(loss {loss.item()})", "lower --lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_losses.append(loss.item())
                if on_step is not None and rank == 0:
                    on_step("qat", step, len(loader), epoch=epoch, loss=float(np.mean(epoch_losses)))
            losses += epoch_losses
    if distributed:
        dist.barrier()
    student.cpu().eval()
    teacher.cpu()
    return {"data": settings.data, "epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
            "steps": len(losses), "world_size": world, "device": device.type, "loss": "distillation from the fp32 model "
            "(KL of per-pixel class distributions)", "first_loss": losses[0] if losses else None,
            "last_epoch_mean_loss": float(np.mean(epoch_losses)) if losses else None,
            "seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def fake_quant_scores(model: nn.Module, teacher: nn.Module, inputs: InputSet, num_classes: int, batch_size: int = 8) -> dict:
    """A fake-quantized PyTorch model on held-out images: its pixel agreement with the fp32 `teacher` and,
    where the images have labels, both models' mIoU against them (the figures before any export or fallback)."""
    model.eval()
    teacher.eval()
    agree = total = 0
    cm_model = np.zeros((num_classes, num_classes), np.int64)
    cm_teacher = np.zeros_like(cm_model)
    labelled = all(im.label is not None for im in inputs.images)
    for start in range(0, len(inputs.images), batch_size):
        chunk = inputs.images[start:start + batch_size]
        pixels = torch.from_numpy(np.stack([im.pixels for im in chunk]))
        got, ref = model(pixels).argmax(1).numpy(), teacher(pixels).argmax(1).numpy()
        agree += int((got == ref).sum())
        total += got.size
        if labelled:
            for k, im in enumerate(chunk):
                cm_model += confusion(got[k], im.label, num_classes)
                cm_teacher += confusion(ref[k], im.label, num_classes)
    record = {"images": len(inputs.images), "pixel_agreement": agree / total}
    if labelled:
        record.update(miou_vs_labels=miou(cm_model), fp32_miou_vs_labels=miou(cm_teacher))
    return record


class WorkerDone(Exception):
    """Raised in a torchrun worker other than rank 0 once training is over: rank 0 alone exports, checks and
    writes; the CLI ends the worker with exit 0."""


def is_rank0() -> bool:
    """Whether this process writes (always, outside torchrun)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def only_rank0_goes_on() -> None:
    """After training under torchrun: WorkerDone in every process but rank 0."""
    if not is_rank0():
        raise WorkerDone


# held-out agreements closer than this (0.01 percentage point) are equal: training neither lowered nor raised it
AGREEMENT_RESOLUTION = 1e-4


def fine_tuned(quantized: nn.Module, teacher: nn.Module, qat: QatSettings, size: tuple[int, int], heldout: InputSet,
               num_classes: int, progress: Progress, on_step: Progress | None = None) -> dict:
    """The QAT step both exporters share: judge the fake-quantized model (its PTQ state), fine-tune it, judge it
    again. Where training lowered held-out agreement with the fp32 model, the PTQ state is put back (an
    artifact never gets worse for having been trained) and the record says so. Under torchrun, only rank 0
    returns (WorkerDone elsewhere). Returns the manifest's `int8.qat` without `layers_left_float`."""
    ptq = fake_quant_scores(quantized, teacher, heldout, num_classes)
    progress(f"int8: PTQ agreement {ptq['pixel_agreement'] * 100:.2f}% on {ptq['images']} held-out images; "
             f"quantization-aware training for {qat.epochs} epoch(s) on {qat.data}")
    before = copy.deepcopy(quantized.state_dict())
    training = finetune(quantized, teacher, qat, size, on_step)
    only_rank0_goes_on()
    after = fake_quant_scores(quantized, teacher, heldout, num_classes)
    change = after["pixel_agreement"] - ptq["pixel_agreement"]
    kept = "qat"
    if change < -AGREEMENT_RESOLUTION:
        quantized.load_state_dict(before)
        kept = "ptq (training lowered held-out agreement; its state was discarded)"
    elif change <= AGREEMENT_RESOLUTION:
        kept = "qat (training left held-out agreement unchanged)"
    effect = {True: "lowered it: exporting the PTQ (untrained) model", False: "exporting the trained model"}[kept.startswith("ptq")]
    progress(f"int8: QAT agreement {after['pixel_agreement'] * 100:.2f}% (PTQ {ptq['pixel_agreement'] * 100:.2f}%, "
             f"{'unchanged' if abs(change) <= AGREEMENT_RESOLUTION else f'{change * 100:+.3f} pt'}); {effect}")
    return {**training, "ptq_before_training": ptq, "qat_before_fallback": after, "kept": kept}
