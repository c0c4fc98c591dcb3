"""`vitseg prune`: structured pruning (+ optional 2:4 sparsity), fine-tuning, and a before/after report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from vitseg_export.cli.common import DataSpec, console, err_console
from vitseg_export.errors import VitsegError


def prune(
    checkpoint: Annotated[str, typer.Argument(help="Run dir, Hugging Face SegFormer dir, or architecture name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory for the pruned checkpoint.")],
    ratio: Annotated[float, typer.Option("--ratio", help="Share of heads/channels to remove, in (0, 1).")] = 0.25,
    method: Annotated[str, typer.Option("--method", help="heads, mlp, channels (SegFormer decoder) or all.")] = "all",
    sparsity: Annotated[Optional[str], typer.Option("--sparsity", help="2:4 magnitude sparsity for TensorRT sparse kernels.")] = None,
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0)] = 0,
    data: DataSpec = "synthetic",
    image_size: Annotated[Optional[int], typer.Option("--image-size")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 16,
    eval_images: Annotated[int, typer.Option("--eval-images", min=1, help="Validation images for the before/after figures.")] = 64,
) -> None:
    """Remove attention heads, MLP channels and decoder channels by importance; fine-tune; report accuracy."""
    import torch

    from vitseg_export.checkpoint import LoadedCheckpoint, load_checkpoint, save_checkpoint
    from vitseg_export.data.sources import open_source
    from vitseg_export.data.transforms import SegmentationDataset
    from vitseg_export.files import atomic_write_bytes
    from vitseg_export.modeling.registry import Segmenter
    from vitseg_export.pruning import apply_2to4, check_2to4, prune_model, reapply_masks
    from vitseg_export.training import TrainSettings, evaluate, train

    if sparsity not in (None, "2:4"):
        raise VitsegError(f"--sparsity {sparsity} is not supported", "use --sparsity 2:4")
    loaded = load_checkpoint(checkpoint)
    size = image_size or loaded.meta.image_size[0]
    val = open_source(data, "val")
    val_subset = torch.utils.data.Subset(SegmentationDataset(val, (size, size), train=False),
                                         range(min(eval_images, len(val))))
    loader = torch.utils.data.DataLoader(val_subset, batch_size=batch_size)

    def score(net) -> dict:
        acc, miou, _ = evaluate(Segmenter(net, loaded.meta.mean, loaded.meta.std), loader,
                                loaded.meta.config.num_classes, torch.device("cpu"))
        return {"pixel_accuracy": acc, "miou": miou}

    report: dict = {"source": checkpoint, "before": score(loaded.model)}
    pruned, prune_report = prune_model(loaded.model, loaded.meta.family, ratio, method)
    report.update(prune_report)
    masks = apply_2to4(pruned) if sparsity else {}
    report["after_pruning"] = score(pruned)
    meta = loaded.meta
    meta.config = pruned.config
    meta.training = {**meta.training, "pruned_from": checkpoint, "prune": {"ratio": ratio, "method": method,
                                                                           "sparsity": sparsity}}
    if finetune_epochs:
        err_console.print(f"fine-tuning for {finetune_epochs} epochs on {data}")
        start = LoadedCheckpoint(pruned.train(), meta, checkpoint, None, "pruned")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(start, TrainSettings(data=data, epochs=finetune_epochs, image_size=size, batch_size=batch_size,
                                       num_workers=1), output,
                  after_step=(lambda net: reapply_masks(net, masks)) if masks else None)
        pruned = load_checkpoint(output).model
    else:
        save_checkpoint(pruned, meta, output)
    report["after_finetuning"] = score(pruned) if finetune_epochs else None
    if sparsity:
        report["sparsity_check"] = check_2to4(pruned)
        if report["sparsity_check"]["violations"]:
            raise VitsegError(f"2:4 pattern lost in {report['sparsity_check']['violations'][:3]}", "report this as a bug")
    atomic_write_bytes(output / "prune.json", (json.dumps(report, indent=2) + "\n").encode())

    def fmt(s):
        return "-" if s is None else f"pixel accuracy {s['pixel_accuracy'] * 100:.2f}%, mIoU {s['miou'] * 100:.2f}"

    console.print(f"params {report['params_before']:,} -> {report['params_after']:,} "
                  f"({(1 - report['params_after'] / report['params_before']) * 100:.1f}% fewer)")
    console.print(f"before: {fmt(report['before'])}")
    console.print(f"after pruning: {fmt(report['after_pruning'])}")
    console.print(f"after fine-tuning: {fmt(report['after_finetuning'])}")
    if sparsity:
        console.print(f"2:4 sparsity holds in {len(report['sparsity_check']['sparse_layers'])} layers "
                      "(build with `vitseg export --format trt --sparsity`)")
    console.print(f"wrote {output} (loads without the original: widths are in its config.json)")
