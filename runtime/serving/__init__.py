"""Serving pcedge bundles on NVIDIA Triton Inference Server.

- :mod:`.repository` -- a Triton model repository from bundles (embedder + scorer + ensemble per bundle);
- :mod:`.python_models` -- the Python-backend models (scorer, and the CPU-only embedder) the repository's
  ``model.py`` files load; they use the detector path of :mod:`pcedge.runtime` and nothing else;
- :mod:`.server` -- start, wait for and stop a ``tritonserver`` process on such a repository;
- :mod:`.client` -- :class:`RemoteDetector`: frames to a server, :class:`~pcedge.runtime.detector.Result` back.

This package sits beside ``watch/`` as a leaf: it imports the detector path, never ``watch/`` or
``evaluation/``, and nothing on the detector path imports it.
"""
