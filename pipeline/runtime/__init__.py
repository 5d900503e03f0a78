"""GPU runtime pieces that need neither PyTorch nor TensorRT to import: the CUDA device
query (`cuda_device`), one small interface over device memory with pycuda and
cuda-python implementations (`cuda_memory`), and the TensorRT engine runner
(`trt_runner`, which imports tensorrt only when a runner is created)."""
