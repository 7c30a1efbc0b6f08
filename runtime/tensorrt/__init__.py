"""TensorRT on the device: which engine fits this GPU, building one, running one.

    engines.py       naming, selection and recording of plans in a bundle (pure Python)
    device.py        the installed TensorRT and CUDA device 0 (compute capability, name, FP16)
    cuda.py          cuda-python's runtime, every call's error checked
    build.py         ONNX graph -> serialized plan (``pcedge build-engine``)
    backend.py       a plan as a :class:`~pcedge.runtime.backends.Backend`
    ort_provider.py  options for ONNX Runtime's TensorRT execution provider
    graph_check.py   static check of an ONNX graph against TensorRT's ONNX parser support

``tensorrt`` and ``cuda-python`` are imported inside functions only: every module here imports on a
machine without them.
"""
