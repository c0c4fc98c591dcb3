"""optimized module -> artifact: ONNX (and, later, precision and TensorRT steps)."""
