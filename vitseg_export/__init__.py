"""vitseg-export: take Vision Transformer segmentation models to the edge, with parity verdicts.

This package must import without torch (the edge path runs ONNX artifacts with numpy, Pillow and
onnxruntime only), so nothing here imports torch at module level.
"""

__version__ = "0.1.0"
