"""Parity checks for your own CI:

    from vitseg_export.verdict.testing import assert_mask_parity

    def test_exported_model_matches():
        assert_mask_parity("model.onnx", reference="runs/best", num_images=8)

Raises AssertionError naming each failed check and by how much; returns the report on success.
"""

from __future__ import annotations

from pathlib import Path

from vitseg_export.formats import read_artifact_info
from vitseg_export.precisions import thresholds_for
from vitseg_export.verdict.locate import locate_artifact
from vitseg_export.verdict.verify import verify_artifact


def assert_mask_parity(artifact: str | Path, reference: str, data: str = "synthetic", num_images: int = 8,
                       device: str = "cpu", batch_sizes: tuple[int, ...] | None = None,
                       sizes: list[tuple[int, int]] | None = None, locate: bool = False, **threshold_overrides) -> dict:
    """Verify `artifact` against `reference` on `num_images` images of `data` at every shape it declares
    (`batch_sizes`/`sizes` as `vitseg verify --batch-sizes/--sizes`), batch consistency included; raise
    AssertionError naming the failing shape and every failed check (with `locate`, also where the artifact first
    leaves PyTorch), else return the report's JSON form. Thresholds default to the precision's preset."""
    artifact = Path(artifact)
    thresholds = thresholds_for(read_artifact_info(artifact).precision, **threshold_overrides)
    result = verify_artifact(artifact, reference, data, num_images, device, thresholds, batch_sizes=batch_sizes,
                             sizes=sizes)
    found = locate_artifact(artifact, reference, data) if locate else None
    if not result.passed:
        where = f"; {found.verdict}" + (f"; fix: {found.keep_float_command}" if found.keep_float_command else "") if found else ""
        raise AssertionError(f"{artifact.name} does not match {reference}{result.failed_at}: " + "; ".join(result.failures) + where)
    return result.to_json() | ({"locate": found.to_json()} if found is not None else {})
