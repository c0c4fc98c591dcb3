"""What the int8 fallback records and prints (export/fallback.py), by hand: the MAC share, the calibration and
fallback records, the mostly-int8 refusal at its edge, the CPU-class record, the speed decision that describes the
written graph, and the lines `vitseg export` prints (issue 37: 289 of the module's mutants were reached by no fast
test, only by the export tests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from vitseg_export.compare.comparator import RecordedOutputs
from vitseg_export.compare.inputs import InputImage, InputSet
from vitseg_export.errors import Int8NotWorthIt, VitsegError
from vitseg_export.export import fallback
from vitseg_export.machine.cpu import cpu_class
from vitseg_export.precisions import Thresholds


def test_mac_share_and_the_score_line():
    assert fallback.mac_share({"a": 30, "b": 10, "c": 60}, {"a", "c"}) == 0.9
    assert fallback.mac_share({"a": 30}, set()) == 0.0 and fallback.mac_share({}, {"a"}) == 0.0
    assert fallback.describe_score((0.991234, 0.98456)) == "agreement 99.123%, mIoU vs reference 98.46"


def test_decision_targets_move_a_tenth_of_the_budget_inwards():
    moved = fallback.decision_targets(Thresholds(0.99, 0.98, 1.0, 2.0))
    assert moved == Thresholds(pytest.approx(0.991), pytest.approx(0.982), None, None)


def _inputs(names):
    import numpy as np

    return InputSet("synthetic[:2] split=val seed=0",
                    [InputImage(name, np.zeros((3, 4, 4), np.float32), None) for name in names])


def test_the_calibration_record_hashes_the_image_list():
    record = fallback.calibration_record(_inputs(["a", "b"]), "minmax", cache="c.json")
    assert record == {"source": "synthetic[:2] split=val seed=0", "images": 2,
                      "image_list_sha256": hashlib.sha256(b"a\nb").hexdigest()[:16], "method": "minmax", "cache": "c.json"}
    assert fallback.calibration_record(_inputs(["b", "a"]), "minmax")["image_list_sha256"] != record["image_list_sha256"]


def test_the_fallback_record_by_hand():
    import numpy as np

    held = fallback.Heldout(_inputs(["a", "b"]), RecordedOutputs([np.zeros((3, 4, 4))] * 2), 3,
                            fallback.decision_targets(Thresholds(0.99, 0.98, None, None)))
    result = fallback.Fallback([{"node": "b1", "sqnr_db_when_float": 31.5, "reason": "why"}], (0.995, 0.99), (0.97, 0.95))
    assert result.units == {"b1"}
    record = fallback.fallback_record(result, held, Thresholds(0.99, 0.98, None, None), {"b1": 25, "b2": 75}, {"b2"})
    assert record == {
        "int8_mac_share": 0.75, "fallback_layers": [{"node": "b1", "sqnr_db_when_float": 31.5, "reason": "why", "macs": 25}],
        "heldout": {"source": "synthetic[:2] split=val seed=0", "images": 2},
        "heldout_agreement": 0.995, "heldout_miou_vs_reference": 0.99,
        "heldout_before_fallback": {"agreement": 0.97, "miou_vs_reference": 0.95},
        "targets": {"min_agreement": 0.99, "min_miou_vs_reference": 0.98},
        "decision_targets": {"min_agreement": pytest.approx(0.991), "min_miou_vs_reference": pytest.approx(0.982)}}
    assert held.meets((0.991, 0.982)) and not held.meets((0.9909, 0.99)) and not held.meets((0.999, 0.9819))
    # a floated unit with no MAC count (a layer group the IR names differently) counts 0 MACs, not None
    unknown = fallback.Fallback([{"node": "group/x", "sqnr_db_when_float": 1.0, "reason": "r"}], (1, 1), (1, 1))
    assert fallback.fallback_record(unknown, held, Thresholds(0.99, 0.98, None, None), {}, set())["fallback_layers"][0]["macs"] == 0


@dataclass
class Settings:
    allow_float_fallback: bool = False
    cpu_class: str = "avx2"


def test_mostly_int8_is_refused_below_half_unless_allowed():
    fallback.check_mostly_int8({"int8_mac_share": 0.5, "fallback_layers": []}, Settings())  # at the edge: int8
    with pytest.raises(Int8NotWorthIt) as refused:
        fallback.check_mostly_int8({"int8_mac_share": 0.49, "fallback_layers": [{}, {}]}, Settings())
    assert refused.value.message.startswith("only 49% of the MACs stayed int8 (2 units went back to float")
    assert refused.value.hint == ("export fp32 here, try quantization-aware training (`vitseg qat`), or accept it with "
                                  "--allow-float-fallback")
    fallback.check_mostly_int8({"int8_mac_share": 0.1, "fallback_layers": []}, Settings(allow_float_fallback=True))


def test_the_cpu_record_names_the_classes_its_verdict_holds_on():
    record = fallback.cpu_record(Settings(cpu_class="avx2"), {"outcome": "faster"}, "not timed: x")
    assert record["cpu_class"] == "avx2" and record["exact_on"] == record["verdict_holds_on"] == ["avx2", "vnni", "amx"]
    assert record["weights"] == "7-bit, saturation-safe" and record["verified_on"] == cpu_class()
    assert record["speed_decision"] == {"before_calibration": {"outcome": "faster"}, "after_fallback": "not timed: x"}
    vnni = fallback.cpu_record(Settings(cpu_class="vnni"), "a", "b")
    assert vnni["weights"] == "8-bit" and "avx2" not in vnni["verdict_holds_on"]
    here_exact = cpu_class() in ("vnni", "amx")
    assert vnni["verified_with"] == ("integer kernels" if here_exact else "int8 emulated in float (exact)")
    assert fallback.cpu_record(Settings(cpu_class="avx2"), "a", "b")["verified_with"] == "integer kernels"  # exact everywhere


SPEED = {"baseline": "fp32", "candidate": "int8", "baseline_ms": 5.04, "candidate_ms": 4.10, "speedup": 1.23,
         "low": 1.18, "high": 1.27, "confidence": 0.95, "margin": 0.1, "pairs": 31, "outcome": "faster"}


def test_the_final_speed_is_after_the_fallback_where_it_was_timed_again():
    assert fallback.final_speed({"speed_decision": {"before_calibration": "b", "after_fallback": SPEED}}) == SPEED
    assert fallback.final_speed({"speed_decision": {"before_calibration": SPEED, "after_fallback": "not timed"}}) == SPEED
    assert fallback.final_speed({}) == "not timed"


def test_what_export_prints_about_int8():
    details = {"int8_mac_share": 0.9651, "target": "cpu", "fallback_layers": [{"node": "enc/b0", "reason": "r1"}],
               "cpu_class": "avx2", "weights": "7-bit, saturation-safe", "exact_on": ["avx2", "vnni", "amx"],
               "speed_decision": {"before_calibration": SPEED, "after_fallback": "not timed"}}
    assert fallback.describe_int8(details) == [
        "int8 (cpu target): 96.5% of MACs run in int8, 1 units fell back to float",
        "  made for avx2 CPUs (7-bit, saturation-safe weights; exact on avx2, vnni, amx); here: int8 1.23x fp32 (95% "
        "interval 1.18-1.27 over 31 pairs; 4.10 vs 5.04 ms): faster (the interval lies above 1.10)",
        "  float: enc/b0 (r1)"]
    mostly_float = fallback.describe_int8({"int8_mac_share": 0.3, "fallback_layers": [],
                                           "speed_decision": {}, "cpu_class": "vnni", "weights": "8-bit",
                                           "exact_on": ["vnni", "amx"]})
    assert mostly_float == ["int8: 30.0% of MACs run in int8, 0 units fell back to float (mostly float: most compute is "
                            "NOT int8)", "  made for vnni CPUs (8-bit weights; exact on vnni, amx); here: not timed"]


class Scopes:
    def in_scope(self, name):
        return lambda node: node.startswith(f"/{name}/")


def test_kept_units_are_those_inside_the_named_modules():
    units = ["/enc.0/a", "/enc.0/b", "/enc.1/a", "/dec/a"]
    assert fallback.kept_units(units, ("enc.0", "dec"), Scopes()) == {"/enc.0/a": "enc.0", "/enc.0/b": "enc.0", "/dec/a": "dec"}
    with pytest.raises(VitsegError) as none_inside:
        fallback.kept_units(units, ("enc.2",), Scopes())
    assert none_inside.value.message == "--keep-float enc.2: no quantized layer is inside it"
    assert none_inside.value.hint == "name a module with Conv or Linear layers"


# -- Heldout: the verdict images and the reference's logits the fallback decides on --------------------------------

def _heldout_runners():
    import numpy as np

    from vitseg_export.compare.inputs import noise_inputs

    from .test_comparator_batches import FakeRunner, logits_of

    inputs = noise_inputs((8, 8), 6, seed=3, batch_sizes=(1,))

    class Offset(FakeRunner):
        def __init__(self, images, offset=0.0, fail=False):
            super().__init__(images)
            self.offset, self.fail = offset, fail

        def infer_impl(self, pixels):
            if self.fail:
                raise VitsegError("fake: cannot run", "hint")
            return {"logits": super().infer_impl(pixels)["logits"] + np.float32(self.offset)}

    return inputs, FakeRunner, Offset, logits_of


def test_heldout_of_records_a_live_reference_once_and_moves_the_targets_inwards():
    inputs, FakeRunner, _, logits_of = _heldout_runners()
    reference = FakeRunner(inputs.images).activate()
    held = fallback.Heldout.of((inputs, reference), Thresholds(0.99, 0.98, None, None))
    assert reference.batches == [[i] for i in range(6)]  # each image alone, once
    assert held.num_classes == 3 and held.targets == fallback.decision_targets(Thresholds(0.99, 0.98, None, None))
    assert all((got == logits_of(im.pixels)).all() for got, im in zip(held.reference.logits, inputs.images))
    recorded = RecordedOutputs(held.reference.logits)
    assert fallback.Heldout.of((inputs, recorded), Thresholds(0.99, 0.98, None, None)).reference is recorded


def test_heldout_scores_and_sqnr_by_hand():
    import math

    import numpy as np

    inputs, _, Offset, logits_of = _heldout_runners()
    held = fallback.Heldout.of((inputs, RecordedOutputs([logits_of(im.pixels) for im in inputs.images])),
                               Thresholds(0.99, 0.98, None, None))
    assert held.score(Offset(inputs.images)) == (1.0, 1.0)
    assert held.sqnr_db(Offset(inputs.images)) == math.inf
    # every logit moved by 0.01: SQNR = 10 log10(mean(ref^2) / 0.01^2) on the first PROBE_IMAGES images
    ref = np.stack([logits_of(im.pixels) for im in inputs.images[:fallback.PROBE_IMAGES]]).astype(np.float64)
    expected = 10 * math.log10(float(np.mean(ref ** 2)) / 0.01 ** 2)
    assert held.sqnr_db(Offset(inputs.images, 0.01)) == pytest.approx(expected, abs=1e-3)
    # a uniform offset never changes the argmax: the score stays perfect; a failing candidate says so in one line
    assert held.score(Offset(inputs.images, 0.5)) == (1.0, 1.0)
    with pytest.raises(VitsegError) as failed:
        held.score(Offset(inputs.images, fail=True))
    assert failed.value.message == "the int8 graph could not be run: fake: cannot run"
