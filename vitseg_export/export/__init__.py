"""optimized module -> artifact: the verified fp32 ONNX graph every format starts from (onnx_export), the
precision converters (fp16, int8 with the one fallback), and the OpenVINO and TensorRT exporters."""
