"""trt_prune: prune, sparsify, export, clean, build and profile PyTorch models for TensorRT."""
