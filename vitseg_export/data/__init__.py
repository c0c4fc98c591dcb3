"""Datasets behind one spec string (`synthetic[:N]`, `pets:DIR`, `folder:DIR`) and their transforms."""

from vitseg_export.data.sources import IGNORE_INDEX, PET_CLASSES, Sample, Source, open_source

__all__ = ["IGNORE_INDEX", "PET_CLASSES", "Sample", "Source", "open_source"]
