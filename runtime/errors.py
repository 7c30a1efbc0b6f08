"""Exceptions shared across the runtime (kept apart so that every module can raise them without cycles)."""


class BackendUnavailable(RuntimeError):
    """A requested inference backend cannot run here; the message says why (package, GPU, engine)."""


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT, cuda-python or a CUDA GPU is missing, or no engine matches this device."""


class WatchError(RuntimeError):
    """A watch configuration that cannot work (e.g. ``--show`` without a GUI); the message says why."""
