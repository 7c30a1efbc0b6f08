"""Workstation side: backbones, patch embedder, coreset, fitting, ONNX export (needs torch)."""
