"""trtpipe: PyTorch -> ONNX -> TensorRT engines (FP32/FP16/INT8), validated, compared, versioned.

Heavy libraries (torch, onnxruntime, tensorrt) are imported lazily inside the functions
that need them, so `trtpipe --help` and the GPU-side stages stay light.
"""

__version__ = "0.1.0"
