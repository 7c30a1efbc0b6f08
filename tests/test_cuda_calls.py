"""Every cuda-python call pcedge makes, checked against the real, installed ``cuda.bindings.runtime``.

Without a GPU driver the real functions still check their arguments and return ``(error, *values)``; the
tuple's length is what pcedge's ``cuda_call`` unpacks. A call with a name, an argument count or an argument
type the real package rejects fails here.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is declared in the test extra")

from pcedge.runtime.errors import TensorRTUnavailable  # noqa: E402
from pcedge.runtime.tensorrt import cuda, device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _stream():
    return runtime.cudaStream_t(0x1000)


#: name -> (arguments with pcedge's types, number of values after the error)
CALLS = {
    "cudaGetDeviceCount": ((), 1),
    "cudaGetDeviceProperties": ((0,), 1),
    "cudaMalloc": ((4096,), 1),
    "cudaFree": ((0x2000,), 0),
    "cudaMallocHost": ((4096,), 1),
    "cudaHostAlloc": ((4096, runtime.cudaHostAllocMapped), 1),
    "cudaHostGetDevicePointer": ((0x2000, 0), 1),
    "cudaFreeHost": ((0x2000,), 0),
    "cudaMemcpyAsync": ((0x2000, 0x3000, 4096, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice, _stream()), 0),
    "cudaStreamCreate": ((), 1),
    "cudaStreamDestroy": ((_stream(),), 0),
    "cudaStreamSynchronize": ((_stream(),), 0),
    "cudaGetErrorString": ((runtime.cudaError_t.cudaErrorNoDevice,), 1),
    "cudaDriverGetVersion": ((), 1),
    "cudaRuntimeGetVersion": ((), 1),
}


def _calls_in_pcedge() -> set[str]:
    """Every ``cudart.<name>`` pcedge's TensorRT code touches (read from its source, not listed by hand)."""
    names = set()
    for path in (ROOT / "runtime" / "tensorrt").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cudart":
                names.add(node.attr)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                value = node.args[1].value
                if isinstance(value, str) and value.startswith("cuda"):
                    names.add(value)
    return names


def test_every_cudart_name_pcedge_uses_exists_and_is_covered_here():
    used = _calls_in_pcedge()
    assert used, "found no cudart calls: the source scan is broken"
    for name in used:
        assert hasattr(runtime, name), f"pcedge uses cudart.{name}, which cuda.bindings.runtime does not have"
    functions = {n for n in used if callable(getattr(runtime, n)) and not isinstance(getattr(runtime, n), type)
                 and n not in ("cudaMemcpyKind",)}
    assert functions <= set(CALLS), f"calls without a signature check here: {sorted(functions - set(CALLS))}"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_call_accepts_pcedges_arguments_and_returns_the_tuple_shape_pcedge_unpacks(name):
    args, n_values = CALLS[name]
    function = getattr(runtime, name)
    inspect.signature(function).bind(*args)
    if runtime.cudaGetDeviceCount()[0] == runtime.cudaError_t.cudaSuccess and name in (
            "cudaFree", "cudaFreeHost", "cudaMemcpyAsync", "cudaHostGetDevicePointer", "cudaStreamDestroy",
            "cudaStreamSynchronize"):
        pytest.skip("a working driver: fake pointers must not reach it")
    result = function(*args)
    assert isinstance(result, tuple) and len(result) == 1 + n_values
    assert isinstance(result[0], runtime.cudaError_t)


def test_stream_handle_comes_from_the_native_handle_helper():
    stream = _stream()
    assert cuda.native_handle(stream) == 0x1000


def test_cuda_call_unpacks_real_results():
    err, text = runtime.cudaGetErrorString(runtime.cudaError_t.cudaErrorNoDevice)
    assert cuda.cuda_call(runtime, (err, text), "x") == text
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        cuda.cuda_call(runtime, (runtime.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


def test_probe_on_this_machine_diagnoses_the_real_cuda_state(monkeypatch):
    """No driver here: the real cudaGetDeviceCount says cudaErrorInsufficientDriver, which needs a version
    hint, not "no CUDA GPU" (fault 8)."""
    code = runtime.cudaGetDeviceCount()[0]
    if code == runtime.cudaError_t.cudaSuccess:
        pytest.skip("this machine has a working CUDA driver")
    with pytest.raises(TensorRTUnavailable) as caught:
        device._describe_device_0(runtime)
    message = str(caught.value)
    assert code.name in message
    if code == runtime.cudaError_t.cudaErrorInsufficientDriver:
        assert "no CUDA GPU" not in message and "cuda-python runtime is CUDA" in message
        assert "cuda-python==12.6" in message
