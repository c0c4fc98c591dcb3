"""The one int8 fallback, for every quantizer (onnxruntime's and Model Optimizer's Q/DQ graphs, NNCF's
FakeQuantize IRs): when a quantized graph misses the int8 targets on held-out images, return the units that
help most to float (their original fp32 weights back), the fewest that meet the targets.

- held-out images: the export's verdict images with PyTorch's logits recorded once (`Heldout`, from the export
  session); every candidate is scored through the comparator with the verdict's metric (pixel agreement and mIoU
  against PyTorch), aiming DECISION_GUARD inside the targets, so the final verdict at batch 1 repeats its figures.
- ranking: each unit alone returned to float, scored by the logit SQNR (dB) against the reference on 4 of
  the images: one quantized graph serves every probe, nothing is re-calibrated.
- search: the most helpful 1, 2, 4... units until the targets hold, then bisection between the last count
  that missed and the first that met.
- the record: which units went back to float and why, the held-out scores, the int8 share of the MACs.

A quantizer comes in as a small adapter (`QuantizedGraph`): its units (layers, or layer groups), a runner of
the graph with some of them in float, and the MACs of its layers.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from vitseg_export.compare.comparator import RecordedOutputs, compare, record
from vitseg_export.compare.inputs import InputSet
from vitseg_export.errors import Int8NotWorthIt, ParityError, VitsegError
from vitseg_export.machine.cpu import SAFE_CLASS, classes_exact_for, cpu_class, int8_exact_here
from vitseg_export.machine.timing import SpeedComparison
from vitseg_export.precisions import Thresholds
from vitseg_export.progress import Progress
from vitseg_export.runners.base import Runner

# The fallback aims this share of each error budget inside the targets, so that a fresh sample of the
# same distribution (`vitseg verify` on other images) passes too: on vit-seg-base a graph accepted at
# exactly the targets (mIoU 98.01 on its 64 self-parity images) read 97.89 on verify's 32 other images.
DECISION_GUARD = 0.1
PROBE_IMAGES = 4  # held-out images each unit's sensitivity is measured on


def decision_targets(targets: Thresholds) -> Thresholds:
    """The held-out thresholds the fallback decides by: the int8 targets moved DECISION_GUARD of their error
    budget inwards (99% agreement -> 99.1%, 98 mIoU -> 98.2)."""
    def inward(target: float) -> float:
        return target + DECISION_GUARD * (1.0 - target)

    return Thresholds(inward(targets.min_agreement), inward(targets.min_miou_vs_reference), None, None)


Score = tuple[float, float]  # (pixel agreement, mIoU) against the reference (PyTorch)


def describe_score(score: Score) -> str:
    """'agreement 99.123%, mIoU vs reference 98.45'."""
    return f"agreement {score[0] * 100:.3f}%, mIoU vs reference {score[1] * 100:.2f}"


@dataclass
class Heldout:
    """The held-out images that decide the fallback, the reference's logits on them, the decision targets."""

    inputs: InputSet
    reference: RecordedOutputs
    num_classes: int
    targets: Thresholds

    @classmethod
    def of(cls, heldout: tuple[InputSet, RecordedOutputs | Runner], targets: Thresholds) -> "Heldout":
        """The export's verdict images and the reference's outputs on them (ExportSession.heldout: PyTorch, recorded
        once), decided by `targets` moved inwards: the fallback's figures are the final verdict's at batch 1."""
        inputs, reference = heldout
        if not isinstance(reference, RecordedOutputs):  # too large to keep: recorded here for the search
            reference = record(reference, inputs)
        return cls(inputs, reference, reference.logits[0].shape[0], decision_targets(targets))

    def score(self, runner: Runner) -> Score:
        """(pixel agreement, mIoU vs the reference) of a candidate runner (inactive) on every held-out image."""
        with runner:
            result = compare(self.reference, {"int8": runner}, self.inputs, self.targets, self.num_classes)
        verdict = result.comparisons["int8"]
        if verdict.summary is None:
            raise VitsegError(f"the int8 graph could not be run: {verdict.error}", "report this with the checkpoint")
        return verdict.summary.pixel_agreement, verdict.summary.miou_vs_reference

    def meets(self, score: Score) -> bool:
        """Whether a score reaches the decision targets."""
        return score[0] >= self.targets.min_agreement and score[1] >= self.targets.min_miou_vs_reference

    def sqnr_db(self, runner: Runner) -> float:
        """Logit SQNR (dB) of a candidate (inactive) against the reference on the first PROBE_IMAGES images."""
        probe = InputSet(self.inputs.source, self.inputs.images[:PROBE_IMAGES])
        with runner:
            got = np.stack(record(runner, probe).logits).astype(np.float64)
        ref = np.stack(self.reference.logits[:len(probe)]).astype(np.float64)
        noise, signal = float(np.mean((ref - got) ** 2)), float(np.mean(ref ** 2))
        return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


class QuantizedGraph(Protocol):
    """One quantizer's output, as the fallback sees it."""

    def units(self) -> list[str]:
        """What can return to float, one unit at a time (a layer, or a group of layers)."""
        ...

    def runner(self, floated: set[str]) -> Runner:
        """An inactive runner of the quantized graph with the `floated` units computing in float."""
        ...


@dataclass
class Fallback:
    """What the fallback decided: the units returned to float (most helpful first) and the held-out score."""

    floated: list[dict] = field(default_factory=list)  # {"node", "sqnr_db_when_float", "reason"[, "after"]}
    score: Score = (0.0, 0.0)
    initial: Score = (0.0, 0.0)  # the fully quantized graph's score

    @property
    def units(self) -> set[str]:
        """The names of the units in float."""
        return {row["node"] for row in self.floated}


def fall_back(graph: QuantizedGraph, held: Heldout, max_units: int, progress: Progress,
              hint: str = "calibrate on more representative images, try --calib-method entropy, or use fp16",
              kept: dict[str, str] | None = None) -> Fallback:
    """The fewest of the most helpful units of `graph` returned to float that meet the held-out targets
    (none when the fully quantized graph meets them), besides the units `kept` in float from the start (unit ->
    the --keep-float name it is kept for). Raises ParityError (a failed verdict: exit 3) when even `max_units` of
    them in float miss the targets."""
    kept = kept or {}
    kept_rows = [{"node": unit, "sqnr_db_when_float": None, "reason": f"kept in float (--keep-float {name})"}
                 for unit, name in kept.items()]
    initial = held.score(graph.runner(set(kept)))
    progress(f"int8 held-out {describe_score(initial)} (aiming at {held.targets.min_agreement * 100:.2f}% / "
             f"{held.targets.min_miou_vs_reference * 100:.2f})" + (f", {len(kept)} units kept in float" if kept else ""))
    if held.meets(initial):
        return Fallback(kept_rows, initial, initial)
    units = [u for u in graph.units() if u not in kept]
    progress(f"int8: ranking {len(units)} units by the logits with each alone in float")
    ranked = sorted(((held.sqnr_db(graph.runner({u, *kept})), u) for u in units), reverse=True)[:max_units]
    tried: dict[int, Score] = {0: initial}
    if not ranked:  # every unit kept in float already (or none allowed): nothing left to fall back
        raise ParityError(f"int8 could not reach the int8 targets on held-out images ({describe_score(initial)} with "
                          f"no unit left to return to float: {len(kept)} kept by --keep-float, {len(units)} others, "
                          f"at most {max_units} allowed)", hint)

    def attempt(count: int) -> bool:
        tried[count] = held.score(graph.runner({*kept, *(u for _, u in ranked[:count])}))
        progress(f"int8: {count} units in float: {describe_score(tried[count])}")
        return held.meets(tried[count])

    low, high = 0, 1
    while high < len(ranked) and not attempt(high):
        low, high = high, min(2 * high, len(ranked))
    if (high not in tried and not attempt(high)) or not held.meets(tried[high]):
        raise ParityError(f"int8 could not reach the int8 targets on held-out images ({describe_score(tried[high])} with "
                          f"{high} of {len(units)} units in float)", hint)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if attempt(middle) else (middle, high)
    floated = [{"node": unit, "sqnr_db_when_float": round(sqnr, 2),
                "reason": f"most helpful remaining unit (logit SQNR {sqnr:.1f} dB with it alone in float)"}
               for sqnr, unit in ranked[:high]]
    floated[-1]["after"] = describe_score(tried[high])
    return Fallback(kept_rows + floated, tried[high], initial)


def kept_units(units: list[str], names: tuple[str, ...], scopes) -> dict[str, str]:
    """The units (quantized layers or layer groups, by node name) inside the modules `names` asks to keep in
    float (export/scopes.py ModuleScopes): unit -> the name it is kept for. VitsegError when a name holds none."""
    kept: dict[str, str] = {}
    for name in names:
        inside = [u for u in units if scopes.in_scope(name)(u)]
        if not inside:
            raise VitsegError(f"--keep-float {name}: no quantized layer is inside it", "name a module with Conv or Linear layers")
        kept.update(dict.fromkeys(inside, name))
    return kept


def mac_share(macs: dict[str, int], int8_layers: set[str]) -> float:
    """The share of the MACs computed by `int8_layers` (0 when there are no MACs)."""
    total = sum(macs.values())
    return sum(m for name, m in macs.items() if name in int8_layers) / total if total else 0.0


def calibration_record(calib: InputSet, method: str, **extra) -> dict:
    """Where the calibration images came from (the manifest's `calibration`): source, count, a hash of the
    image list, the method."""
    names = "\n".join(im.name for im in calib.images)
    return {"source": calib.source, "images": len(calib), "image_list_sha256": hashlib.sha256(names.encode()).hexdigest()[:16],
            "method": method, **extra}


def fallback_record(result: Fallback, held: Heldout, targets: Thresholds, macs: dict[str, int],
                    int8_layers: set[str]) -> dict:
    """The part of every int8 manifest the fallback decides: the int8 MAC share, the units in float and why,
    the held-out scores and where the held-out images came from, the targets it aimed at."""
    floated = [{**row, "macs": macs.get(row["node"], 0)} for row in result.floated]
    return {"int8_mac_share": mac_share(macs, int8_layers), "fallback_layers": floated,
            "heldout": {"source": held.inputs.source, "images": len(held.inputs)},
            "heldout_agreement": result.score[0], "heldout_miou_vs_reference": result.score[1],
            "heldout_before_fallback": {"agreement": result.initial[0], "miou_vs_reference": result.initial[1]},
            "targets": {"min_agreement": targets.min_agreement, "min_miou_vs_reference": targets.min_miou_vs_reference},
            "decision_targets": {"min_agreement": held.targets.min_agreement,
                                 "min_miou_vs_reference": held.targets.min_miou_vs_reference}}


MOSTLY_INT8 = 0.5  # below this share of MACs in int8, an "int8" artifact is a float model with int8-rounded weights


def check_mostly_int8(record: dict, settings) -> None:
    """Int8NotWorthIt when the fallback left under half of the MACs in int8 (unless allowed)."""
    share = record["int8_mac_share"]
    if share < MOSTLY_INT8 and not settings.allow_float_fallback:
        raise Int8NotWorthIt(f"only {share * 100:.0f}% of the MACs stayed int8 ({len(record['fallback_layers'])} units went "
                             "back to float to meet the targets): this would be a float model with int8-rounded weights",
                             "export fp32 here, try quantization-aware training (`vitseg qat`), or accept it with "
                             "--allow-float-fallback")


def cpu_record(settings, before: dict | str, after: dict | str) -> dict:
    """The manifest's CPU-class record of an int8 CPU artifact: what its arithmetic is made for, the classes its
    verdict holds on, and the speed decisions (int8_probe.speed_decision records, or why none was timed) before
    calibrating and after the fallback. Its verdict holds on every class it is exact on: where this CPU's integer
    kernels are not exact for it, the runners emulated them exactly."""
    here = cpu_class()
    return {"cpu_class": settings.cpu_class, "exact_on": classes_exact_for(settings.cpu_class), "verified_on": here,
            "verified_with": "integer kernels" if int8_exact_here(settings.cpu_class) else "int8 emulated in float (exact)",
            "verdict_holds_on": classes_exact_for(settings.cpu_class),
            "weights": "7-bit, saturation-safe" if settings.cpu_class == SAFE_CLASS else "8-bit",
            "speed_decision": {"before_calibration": before, "after_fallback": after}}


def final_speed(details: dict) -> dict | str:
    """The speed decision that describes the written int8 graph: after the fallback where it was timed again,
    else the one before calibrating."""
    decision = details.get("speed_decision", {})
    after = decision.get("after_fallback")
    return after if isinstance(after, dict) else decision.get("before_calibration", "not timed")


def describe_int8(details: dict) -> list[str]:
    """What `vitseg export` prints about an int8 manifest section: the MAC share, the layers in float, the CPU
    class it is made for and how it compared with fp32 here."""
    share = details["int8_mac_share"]
    target = f" ({details['target']} target)" if details.get("target") else ""
    lines = [f"int8{target}: {share * 100:.1f}% of MACs run in int8, {len(details['fallback_layers'])} units fell back "
             "to float" + (" (mostly float: most compute is NOT int8)" if share < MOSTLY_INT8 else "")]
    if details.get("cpu_class"):
        speed = final_speed(details)
        lines.append(f"  made for {details['cpu_class']} CPUs ({details['weights']} weights; exact on "
                     f"{', '.join(details['exact_on'])}); here: " + (SpeedComparison.from_json(speed).describe() if isinstance(speed, dict) else speed))
    return lines + [f"  float: {row['node']} ({row['reason']})" for row in details["fallback_layers"]]
