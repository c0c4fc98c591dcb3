"""checkpoint -> pruned run directory: `vitseg prune`. Prune (pruning.py), optionally sparsify 2:4 and
fine-tune (train/training.py), and report accuracy before, after pruning and after fine-tuning in `prune.json`."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from vitseg_export.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
from vitseg_export.data.sources import open_source
from vitseg_export.data.transforms import SegmentationDataset
from vitseg_export.errors import VitsegError
from vitseg_export.files import write_json
from vitseg_export.modeling.pruning import apply_2to4, check_2to4, prune_model, reapply_masks
from vitseg_export.modeling.registry import Segmenter
from vitseg_export.progress import Progress, silent
from vitseg_export.train.training import TrainSettings, evaluate, train


@dataclass
class PruneSettings:
    ratio: float = 0.25
    method: str = "all"
    sparsity: str | None = None  # "2:4"
    finetune_epochs: int = 0
    data: str = "synthetic"
    image_size: int | None = None
    batch_size: int = 16
    eval_images: int = 64


def _scorer(loaded, settings: PruneSettings) -> Callable[[nn.Module], dict]:
    """Validation pixel accuracy and mIoU of a network (same normalization as the checkpoint)."""
    size = settings.image_size or loaded.meta.image_size[0]
    val = open_source(settings.data, "val")
    subset = torch.utils.data.Subset(SegmentationDataset(val, (size, size), train=False),
                                     range(min(settings.eval_images, len(val))))
    loader = torch.utils.data.DataLoader(subset, batch_size=settings.batch_size)

    def score(net: nn.Module) -> dict:
        acc, miou, _ = evaluate(Segmenter(net, loaded.meta.mean, loaded.meta.std), loader,
                                loaded.meta.config.num_classes, torch.device("cpu"))
        return {"pixel_accuracy": acc, "miou": miou}

    return score


def _finetune(pruned: nn.Module, meta, checkpoint: str, output: Path, settings: PruneSettings, masks: dict) -> nn.Module:
    start = LoadedCheckpoint(pruned.train(), meta, checkpoint, None, "pruned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(start, TrainSettings(data=settings.data, epochs=settings.finetune_epochs, image_size=settings.image_size,
                                   batch_size=settings.batch_size, num_workers=1), output,
              after_step=(lambda net: reapply_masks(net, masks)) if masks else None)
    return load_checkpoint(output).model


def prune_checkpoint(checkpoint: str, output: Path, settings: PruneSettings,
                     log: Progress = silent, revision: str | None = None) -> dict:
    """Prune a checkpoint, optionally sparsify (2:4) and fine-tune, and write the pruned run directory with
    `prune.json` (accuracy before, after pruning and after fine-tuning). Returns that report; raises
    VitsegError for bad settings or a lost 2:4 pattern."""
    if settings.sparsity not in (None, "2:4"):
        raise VitsegError(f"--sparsity {settings.sparsity} is not supported", "use --sparsity 2:4")
    loaded = load_checkpoint(checkpoint, revision=revision)
    score = _scorer(loaded, settings)
    report: dict = {"source": checkpoint, "before": score(loaded.model)}
    pruned, prune_report = prune_model(loaded.model, loaded.meta.family, settings.ratio, settings.method)
    report.update(prune_report)
    masks = apply_2to4(pruned) if settings.sparsity else {}
    report["after_pruning"] = score(pruned)
    meta = copy.deepcopy(loaded.meta)
    meta.config = pruned.config
    meta.training = {**meta.training, "pruned_from": checkpoint,
                     "prune": {"ratio": settings.ratio, "method": settings.method, "sparsity": settings.sparsity}}
    if settings.finetune_epochs:
        log(f"fine-tuning for {settings.finetune_epochs} epochs on {settings.data}")
        pruned = _finetune(pruned, meta, checkpoint, output, settings, masks)
    else:
        save_checkpoint(pruned, meta, output)
    report["after_finetuning"] = score(pruned) if settings.finetune_epochs else None
    if settings.sparsity:
        report["sparsity_check"] = check_2to4(pruned)
        if report["sparsity_check"]["violations"]:
            raise VitsegError(f"2:4 pattern lost in {report['sparsity_check']['violations'][:3]}", "report this as a bug")
    write_json(output / "prune.json", report)
    return report
