"""Strict stand-ins for TensorRT (per release, from NVIDIA's binding sources) and cuda-python's runtime."""
