from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vitseg_export.data.sources import IGNORE_INDEX, open_source
from vitseg_export.data.transforms import SegmentationDataset
from vitseg_export.errors import DataError


def test_synthetic_is_deterministic_pet_like_and_splits_are_disjoint():
    a, b = open_source("synthetic[:6]", "train"), open_source("synthetic[:6]", "train")
    assert len(a) == 6
    for i in range(6):
        sa, sb = a[i], b[i]
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image)) and np.array_equal(sa.mask, sb.mask)
        assert set(np.unique(sa.mask)) == {0, 1, 2}  # pet, background and border all present
        frac = np.bincount(sa.mask.ravel(), minlength=3) / sa.mask.size
        assert 0.05 < frac[0] < 0.7 and frac[1] > 0.2 and 0.01 < frac[2] < 0.3
    val = open_source("synthetic[:6]", "val")
    calib = open_source("synthetic[:6]", "calib")
    train_imgs = {np.asarray(s.image).tobytes() for s in a}
    assert not train_imgs & {np.asarray(s.image).tobytes() for s in val}
    assert not train_imgs & {np.asarray(s.image).tobytes() for s in calib}
    assert a.fingerprint() != val.fingerprint()
    # images vary: not one colour scheme repeated
    means = [np.asarray(s.image).reshape(-1, 3).mean(0) for s in a]
    assert np.std(means, axis=0).max() > 10


def test_synthetic_default_sizes_and_bad_specs():
    assert len(open_source("synthetic", "train")) == 1000 and len(open_source("synthetic", "val")) == 64
    for spec in ["synthetic[:0]", "imagenet", "pets:/does/not/exist", "synthetic[5]"]:
        with pytest.raises(DataError):
            open_source(spec)


def _write_fake_pets(root, names_trainval, names_test, size=(40, 30)):
    (root / "images").mkdir(parents=True)
    (root / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in names_trainval + names_test:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        trimap = np.full((size[1], size[0]), 2, np.uint8)
        trimap[5:20, 5:25] = 1
        trimap[4, 5:25] = 3
        Image.fromarray(trimap).save(root / "annotations" / "trimaps" / f"{name}.png")
    (root / "annotations" / "trainval.txt").write_text("".join(f"{n} 1 1 1\n" for n in names_trainval))
    (root / "annotations" / "test.txt").write_text("".join(f"{n} 2 2 1\n" for n in names_test))


def test_oxford_pets_layout_maps_trimap_values(tmp_path):
    _write_fake_pets(tmp_path, ["Abyssinian_1", "beagle_2"], ["Bengal_3"])
    train, val = open_source(f"pets:{tmp_path}", "train"), open_source(f"pets:{tmp_path}", "val")
    assert [s.name for s in train] == ["Abyssinian_1", "beagle_2"] and [s.name for s in val] == ["Bengal_3"]
    mask = train[0].mask
    assert mask[10, 10] == 0 and mask[25, 35] == 1 and mask[4, 10] == 2  # trimap 1/2/3 -> pet/background/border
    (tmp_path / "annotations" / "test.txt").unlink()
    with pytest.raises(DataError, match="test.txt is missing"):
        open_source(f"pets:{tmp_path}", "val")


def test_folder_with_classes_and_ignore_index(tmp_path, image_folder):
    def road_car_and_an_ignored_row(i):
        m = np.zeros((10, 20), np.uint8)
        m[:, 10:] = 1
        m[0] = IGNORE_INDEX
        return m

    spec = image_folder(tmp_path, 12, size=(20, 10), mask_for=road_car_and_an_ignored_row, class_names=["road", "car"])
    train, val = open_source(spec, "train"), open_source(spec, "val")
    assert train.class_names == ("road", "car") and len(train) == 11 and [s.name for s in val] == ["im09"]
    ds = SegmentationDataset(val, (8, 16), train=False)
    image, mask = ds[0]
    assert image.shape == (3, 8, 16) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert set(mask.unique().tolist()) == {0, 1, IGNORE_INDEX}
    (tmp_path / "masks" / "im00.png").unlink()
    with pytest.raises(DataError, match="im00.png is missing"):
        open_source(spec, "train")[0]


def test_training_transform_flips_image_and_mask_together():
    source = open_source("synthetic[:4]", "train")
    plain = SegmentationDataset(source, (64, 64), train=False)
    augmented = SegmentationDataset(source, (64, 64), train=True)
    flipped_seen = False
    for seed in range(8):
        torch.manual_seed(seed)
        _, mask_aug = augmented[1]
        _, mask = plain[1]
        assert torch.equal(mask_aug, mask) or torch.equal(mask_aug, mask.flip(-1))
        flipped_seen |= not torch.equal(mask_aug, mask)
    assert flipped_seen
