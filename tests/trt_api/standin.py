"""Strict stand-ins for ``tensorrt`` and ``cuda.bindings.runtime``, for tests on a machine without a GPU.

``tensorrt``: :func:`make_tensorrt` builds a module for one release whose every class, enum, method,
property and keyword argument comes from ``api_<release>.py`` (generated from NVIDIA/TensorRT's
``pyCore.cpp``, ``pyGraph.cpp``, ``pyFoundationalTypes.cpp`` and ``pyOnnx.cpp`` on that release's branch
by ``generate.py``). Touching a name the release does not bind raises ``AttributeError``; a keyword the
binding does not declare, or too many positional arguments, raises ``TypeError`` -- as pybind11 would. The
*behaviour* behind those names is simulated: the ONNX parser reads the graph with ``onnx``, a "plan" is the
graph plus its build settings, and ``execute_async_v3`` runs the graph with ONNX Runtime (CPU) on the
memory at the bound addresses. Plans are checked on deserialization as TensorRT documents: exact version
(or version-compatible and newer within the major, with ``engine_host_code_allowed``) and the same GPU (or
hardware-compatible).

``cuda.bindings.runtime``: :class:`FakeCudart` serves the calls pcedge makes with host memory standing in
for device memory. Every attribute must exist in the real, installed package; every call is bound against
the real function's signature and -- where the real runtime has no usable driver (CI, this machine) --
also passed to the real function, so argument types it would reject fail here, and the result tuple has the
real one's length.
"""

from __future__ import annotations

import ctypes
import importlib
import inspect
import json
import threading
import types
from dataclasses import dataclass, field

import numpy as np

RELEASES = {"8.6": "api_8_6", "10.3": "api_10_3", "10.16": "api_10_16", "11": "api_11"}
PLAN_MAGIC = b"pcedge-standin-plan\n"


def load_api(release: str):
    return importlib.import_module(f"trt_api.{RELEASES[release]}")


# ------------------------------------------------------------------------------------------ the GPU


@dataclass
class SimulatedGPU:
    """What the fake CUDA device is, and which faults to inject."""

    sm: str = "sm87"
    name: str = "Orin"
    multiprocessors: int = 16
    integrated: bool = True
    cuda_starts: bool = True  # False: trt.Builder / trt.Runtime raise pybind11's nullptr TypeError
    device_count_error: str | None = None  # e.g. "cudaErrorInsufficientDriver" from cudaGetDeviceCount
    malloc_fails_after: int | None = None  # cudaMalloc returns cudaErrorMemoryAllocation after N successes
    allocations: dict[int, object] = field(default_factory=dict)  # address -> ctypes buffer (live memory)
    kinds: dict[int, str] = field(default_factory=dict)  # address -> "device" | "pinned" | "mapped"
    calls: list[str] = field(default_factory=list)  # every cudart call made, in order
    streams: set[int] = field(default_factory=set)  # live stream handles (shared by cudart and tensorrt)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alloc(self, size: int, kind: str) -> int:
        buffer = ctypes.create_string_buffer(max(int(size), 1))
        address = ctypes.addressof(buffer)
        with self.lock:
            self.allocations[address] = buffer
            self.kinds[address] = kind
        return address

    def free(self, address: int, kinds: tuple[str, ...]) -> bool:
        with self.lock:
            if self.kinds.get(int(address)) not in kinds:
                return False
            del self.allocations[int(address)]
            del self.kinds[int(address)]
        return True

    def live(self, kind: str | None = None) -> int:
        return sum(1 for k in self.kinds.values() if kind is None or k == kind)

    def view(self, address: int, count: int) -> np.ndarray:
        """float32 ``[count]`` at ``address``, which must lie inside one live allocation."""
        address = int(address)
        with self.lock:
            for base, buffer in self.allocations.items():
                if base <= address and address + count * 4 <= base + ctypes.sizeof(buffer):
                    return np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(ctypes.c_float)), shape=(count,))
        raise RuntimeError(f"illegal memory access: {count * 4} bytes at {address:#x} are not allocated")


# ------------------------------------------------------------------------------------------ strictness


class _StrictType(type):
    """Class-level attribute access limited to the release's names (``trt.BuilderFlag.FP16`` on 11.x fails)."""

    def __getattribute__(cls, name):
        allowed = type.__getattribute__(cls, "__dict__").get("_allowed")
        if allowed is not None and not name.startswith("_") and name not in allowed:
            release = type.__getattribute__(cls, "_release")
            raise AttributeError(f"type object 'tensorrt.{type.__getattribute__(cls, '__name__')}' has no attribute "
                                 f"{name!r} (not bound in TensorRT {release})")
        return type.__getattribute__(cls, name)


class _Strict(metaclass=_StrictType):
    _allowed: frozenset | None = None
    _release = ""

    def __getattribute__(self, name):
        cls = type(self)
        # Only the stand-in's own classes are checked: a user subclass (a Python ILogger) may add names.
        if "_allowed" in type.__getattribute__(cls, "__dict__") and not name.startswith("_"):
            allowed = type.__getattribute__(cls, "_allowed")
            if name not in allowed:
                raise AttributeError(f"'tensorrt.{cls.__name__}' object has no attribute {name!r} "
                                     f"(not bound in TensorRT {type.__getattribute__(cls, '_release')})")
        return object.__getattribute__(self, name)


def _check_call(cls_name: str, method: str, overloads: list[list[str]], args: tuple, kwargs: dict, release: str):
    """pybind11's overload check on names: some overload must take these positional and keyword arguments."""
    for names in overloads:
        if len(args) <= len(names) and set(kwargs) <= set(names[len(args):]):
            return
    raise TypeError(f"{cls_name}.{method}(): incompatible function arguments for TensorRT {release}; "
                    f"supported keyword sets: {overloads}; got {len(args)} positional and {sorted(kwargs)}")


def _checked(cls_name: str, method: str, overloads: list[list[str]], func, release: str):
    def wrapper(self, *args, **kwargs):
        _check_call(cls_name, method, overloads, args, kwargs, release)
        return func(self, *args, **kwargs)

    wrapper.__name__ = method
    return wrapper


class _EnumValue:
    """A pybind11 enum value: compares by identity of (enum, name), int() gives its index."""

    def __init__(self, enum_name: str, name: str, value: int):
        self.enum_name, self.name, self.value = enum_name, name, value

    def __int__(self):
        return self.value

    def __eq__(self, other):
        return isinstance(other, _EnumValue) and (other.enum_name, other.name) == (self.enum_name, self.name)

    def __hash__(self):
        return hash((self.enum_name, self.name))

    def __repr__(self):
        return f"<{self.enum_name}.{self.name}: {self.value}>"


# ------------------------------------------------------------------------------------------ behaviour


class _Behaviour:
    """Simulated TensorRT objects; each is wrapped in a strict class per release by :func:`make_tensorrt`."""

    class ILogger:
        def __init__(self):
            pass

        def log(self, severity, msg):
            pass

    class Logger:
        def __init__(self, min_severity=None):
            self.min_severity = min_severity
            self._messages = []

        def log(self, severity, msg):
            self._messages.append((severity, msg))

    class Dims(tuple):
        pass

    class IHostMemory(bytes):
        @property
        def nbytes(self):
            return len(self)

    class Builder:
        def __init__(self, logger):
            trt = self._trt
            if not isinstance(logger, trt.ILogger):
                raise TypeError("Builder(): logger must be a tensorrt.ILogger")
            if not trt._gpu.cuda_starts:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self._logger = logger

        def create_network(self, flags=0):
            return self._trt.INetworkDefinition._make(int(flags))

        def create_builder_config(self):
            return self._trt.IBuilderConfig._make(self._logger)

        def create_optimization_profile(self):
            return self._trt.IOptimizationProfile._make()

        @property
        def platform_has_fast_fp16(self):
            return True

        def build_serialized_network(self, network, config, kernel_text=None):
            trt = self._trt
            if network._model is None:
                self._logger.log(trt.ILogger.ERROR, "Network has no layers (nothing parsed)")
                return None
            if not config._profiles:
                self._logger.log(trt.ILogger.ERROR, "Network has dynamic or shape inputs, but no optimization profile")
                return None
            header = {
                "version": trt.__version__, "sm": trt._gpu.sm, "flags": sorted(config._flags),
                "hardware_compat": config.hardware_compatibility_level.name,
                "profile": config._profiles[0]._shapes, "inputs": network._inputs, "outputs": network._outputs,
            }
            return trt.IHostMemory._make(PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network._model)

    class INetworkDefinition:
        @classmethod
        def _make(cls, flags):
            self = cls.__new__(cls)
            self._flags, self._model, self._inputs, self._outputs = flags, None, {}, {}
            return self

        @property
        def num_inputs(self):
            return len(self._inputs)

        def get_input(self, index):
            name = list(self._inputs)[index]
            return self._trt.ITensor._make(name, self._inputs[name])

    class ITensor:
        @classmethod
        def _make(cls, name, shape):
            self = cls.__new__(cls)
            self._name, self._shape = name, shape
            return self

        @property
        def name(self):
            return self._name

        @property
        def shape(self):
            return self._trt.Dims._make(self._shape)

    class ParserError:
        @classmethod
        def _make(cls, node, node_name, op, desc):
            self = cls.__new__(cls)
            self._fields = (node, node_name, op, desc)
            return self

        def node(self):
            return self._fields[0]

        def node_name(self):
            return self._fields[1]

        def node_operator(self):
            return self._fields[2]

        def desc(self):
            return self._fields[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self._network, self._logger, self._errors = network, logger, []

        def parse(self, model, path=None):
            import onnx

            trt = self._trt
            if not (trt._major >= 10 or self._network._flags & 1):
                # TensorRT 8.x: flags 0 means implicit batch, which the ONNX parser refuses.
                self._errors.append(trt.ParserError._make(-1, "", "", "Network must have explicit batch dimension"))
                return False
            try:
                proto = onnx.load_from_string(bytes(model))
            except Exception as exc:
                self._errors.append(trt.ParserError._make(-1, "", "", f"failed to parse the model: {exc}"))
                return False
            for index, node in enumerate(proto.graph.node):
                if node.domain not in ("", "ai.onnx"):
                    self._errors.append(trt.ParserError._make(
                        index, node.name, node.op_type, f"No importer registered for op: {node.op_type}"))
            if self._errors:
                return False
            init = {i.name for i in proto.graph.initializer}

            def dims(value):
                return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]

            net = self._network
            net._inputs = {v.name: dims(v) for v in proto.graph.input if v.name not in init}
            net._outputs = {v.name: dims(v) for v in proto.graph.output}
            net._elem = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.input) + list(proto.graph.output)}
            net._model = bytes(model)
            return True

        @property
        def num_errors(self):
            return len(self._errors)

        def get_error(self, index):
            return self._errors[index]

    class IOptimizationProfile:
        @classmethod
        def _make(cls):
            self = cls.__new__(cls)
            self._shapes = {}
            return self

        def set_shape(self, input, min, opt, max):
            self._shapes[input] = [list(min), list(opt), list(max)]

    class ITimingCache:
        @classmethod
        def _make(cls, blob):
            self = cls.__new__(cls)
            self._blob = blob
            return self

        def serialize(self):
            return self._trt.IHostMemory._make(self._blob)

    class IBuilderConfig:
        @classmethod
        def _make(cls, logger):
            self = cls.__new__(cls)
            self._logger = logger
            self._flags, self._profiles, self._pools = set(), [], {}
            self._hw = self._trt.HardwareCompatibilityLevel.NONE
            return self

        def set_memory_pool_limit(self, pool, pool_size):
            self._pools[pool.name] = int(pool_size)

        def set_flag(self, flag):
            self._flags.add(flag.name)

        def add_optimization_profile(self, profile):
            self._profiles.append(profile)
            return len(self._profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            return self._trt.ITimingCache._make(bytes(serialized_timing_cache) or f"cache {self._trt._gpu.sm}".encode())

        def set_timing_cache(self, cache, ignore_mismatch):
            trt = self._trt
            if cache._blob != f"cache {trt._gpu.sm}".encode() and not ignore_mismatch:
                self._logger.log(trt.ILogger.ERROR, "Timing cache mismatch: recorded on another device or version")
                return False
            return True

        @property
        def hardware_compatibility_level(self):
            return self._hw

        @hardware_compatibility_level.setter
        def hardware_compatibility_level(self, value):
            self._hw = value

    class Runtime:
        def __init__(self, logger):
            trt = self._trt
            if not isinstance(logger, trt.ILogger):
                raise TypeError("Runtime(): logger must be a tensorrt.ILogger")
            if not trt._gpu.cuda_starts:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self._logger = logger
            self._host_code = False

        @property
        def engine_host_code_allowed(self):
            return self._host_code

        @engine_host_code_allowed.setter
        def engine_host_code_allowed(self, value):
            self._host_code = bool(value)

        def deserialize_cuda_engine(self, serialized_engine):
            trt = self._trt
            blob = bytes(serialized_engine)
            if not blob.startswith(PLAN_MAGIC):
                self._logger.log(trt.ILogger.ERROR, "Serialization assertion: magic tag does not match")
                return None
            head, _, model = blob[len(PLAN_MAGIC):].partition(b"\n")
            header = json.loads(head)
            built = tuple(int(p) for p in header["version"].split("."))
            here = tuple(int(p) for p in trt.__version__.split("."))
            if "VERSION_COMPATIBLE" in header["flags"]:
                if built[0] != here[0] or here < built:
                    self._logger.log(trt.ILogger.ERROR, "Version compatible plan from an incompatible version")
                    return None
                if not self._host_code:
                    self._logger.log(trt.ILogger.ERROR, "Cannot deserialize engine with lean runtime: "
                                     "engine_host_code_allowed is False")
                    return None
            elif built != here:
                self._logger.log(trt.ILogger.ERROR, f"The engine plan file is not compatible with this version "
                                 f"of TensorRT, expecting {trt.__version__} got {header['version']}")
                return None
            cc = int(trt._gpu.sm[2:])
            if header["hardware_compat"] == "AMPERE_PLUS":
                ok = cc >= 80
            else:
                ok = header["sm"] == trt._gpu.sm
            if not ok:
                self._logger.log(trt.ILogger.ERROR, "The engine plan file is generated on an incompatible device")
                return None
            return trt.ICudaEngine._make(header, model)

    class ICudaEngine:
        @classmethod
        def _make(cls, header, model):
            self = cls.__new__(cls)
            self._header, self._model = header, model
            self._names = list(header["inputs"]) + list(header["outputs"])
            return self

        @property
        def num_io_tensors(self):
            return len(self._names)

        def get_tensor_name(self, index):
            return self._names[index]

        def get_tensor_mode(self, name):
            mode = self._trt.TensorIOMode
            return mode.INPUT if name in self._header["inputs"] else mode.OUTPUT

        def get_tensor_dtype(self, name):
            return self._trt.DataType.FLOAT  # float32 interface (the fp16 graph keeps float32 I/O)

        def get_tensor_profile_shape(self, name, profile_index):
            shapes = self._header["profile"][name]
            return [self._trt.Dims._make(s) for s in shapes]

        def create_execution_context(self, strategy=None):
            return self._trt.IExecutionContext._make(self)

    class IExecutionContext:
        @classmethod
        def _make(cls, engine):
            import onnxruntime as ort

            self = cls.__new__(cls)
            self._engine = engine
            self._shapes, self._addresses = {}, {}
            self._session = ort.InferenceSession(engine._model, providers=["CPUExecutionProvider"])
            self._fp16 = "FP16" in engine._header["flags"]
            return self

        def set_input_shape(self, name, shape):
            low, _, high = self._engine._header["profile"][name]
            shape = [int(d) for d in shape]
            if len(shape) != len(low) or any(not lo <= d <= hi for lo, d, hi in zip(low, shape, high)):
                return False
            self._shapes[name] = shape
            return True

        def _output_shape(self, name):
            (input_name,) = self._engine._header["inputs"]
            batch = self._shapes[input_name][0]
            tail = self._engine._header["outputs"][name][1:]
            return [batch, *tail]

        def get_tensor_shape(self, name):
            if name in self._engine._header["inputs"]:
                return self._trt.Dims._make(self._shapes.get(name, self._engine._header["inputs"][name]))
            return self._trt.Dims._make(self._output_shape(name))

        def set_tensor_address(self, name, memory):
            if not isinstance(memory, int):
                raise TypeError("set_tensor_address(): memory must be an int address")
            self._addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            trt = self._trt
            if not isinstance(stream_handle, int):
                raise TypeError("execute_async_v3(): stream_handle must be an int")
            if stream_handle not in trt._streams:
                raise RuntimeError(f"execute_async_v3 on an unknown stream {stream_handle:#x}")
            (input_name,) = self._engine._header["inputs"]
            (output_name,) = self._engine._header["outputs"]
            shape = self._shapes[input_name]
            gpu = trt._gpu
            images = gpu.view(self._addresses[input_name], int(np.prod(shape))).reshape(shape).copy()
            if self._fp16:
                images = images.astype(np.float16).astype(np.float32)
            out = self._session.run([output_name], {input_name: images})[0]
            if self._fp16:
                out = out.astype(np.float16)
            out_shape = self._output_shape(output_name)
            gpu.view(self._addresses[output_name], int(np.prod(out_shape)))[:] = out.astype(np.float32).reshape(-1)
            return True


def make_tensorrt(release: str, gpu: SimulatedGPU, version: str | None = None) -> types.ModuleType:
    """A ``tensorrt`` module with exactly the names of ``release`` (see :data:`RELEASES`), on ``gpu``."""
    api_module = load_api(release)
    api = api_module.API
    version = version or api_module.VERSION + ".0"
    module = types.ModuleType("tensorrt")
    module.__version__ = version
    module.__file__ = f"<stand-in for TensorRT {version}, {api_module.BRANCH}>"
    module._gpu = gpu
    module._major = int(version.split(".")[0])
    module._streams = gpu.streams
    classes: dict[str, type] = {}

    def allowed(name):
        entry = api[name]
        names = set(entry["methods"]) | set(entry["properties"]) | set(entry["values"])
        for key, nested in api.items():
            if key.startswith(name + "."):
                names.add(key.split(".", 1)[1])
                if nested.get("export_values"):
                    names |= set(nested["values"])
        if entry.get("base") in api:  # pybind11 classes inherit their base's bindings
            names |= allowed(entry["base"])
        return frozenset(names)

    def make_enum(name, entry):
        cls = _StrictType(name.split(".")[-1], (_Strict,), {"_allowed": frozenset(entry["values"]), "_release": version,
                                                             "__module__": "tensorrt"})
        for i, value in enumerate(entry["values"]):
            type.__setattr__(cls, value, _EnumValue(name, value, i))
        return cls

    def make_class(name):
        if name in classes:
            return classes[name]
        entry = api[name]
        base_name = entry.get("base")
        bases = (make_class(base_name),) if base_name in api else (_Strict,)
        behaviour = getattr(_Behaviour, name, None)
        namespace = {"_allowed": allowed(name), "_release": version, "__module__": "tensorrt", "_trt": module}
        if behaviour is not None:
            for attr, value in vars(behaviour).items():
                if attr.startswith("__") and attr not in ("__init__",):
                    continue
                if attr == "__init__":
                    overloads = entry["init"] or [[]]
                    namespace["__init__"] = _checked(name, "__init__", overloads, value, version)
                elif isinstance(value, property) or attr.startswith("_"):
                    if isinstance(value, property) and attr not in entry["properties"]:
                        continue  # behaviour for a name this release does not bind
                    if isinstance(value, property) and entry["properties"].get(attr) == "ro" and value.fset:
                        value = property(value.fget)  # read-only in this release
                    namespace[attr] = value
                elif callable(value):
                    if attr not in entry["methods"]:
                        continue
                    namespace[attr] = _checked(name, attr, entry["methods"][attr], value, version)
        else:
            def refuse(self, *args, **kwargs):
                raise NotImplementedError(f"the stand-in does not simulate tensorrt.{name}")

            namespace["__init__"] = refuse
        base_types = bases
        if behaviour is not None and issubclass(behaviour, (tuple, bytes)):
            base_types = bases + (behaviour,)  # the strict __getattribute__ first in the MRO
        cls = _StrictType(name, base_types, namespace)
        if behaviour is not None and issubclass(behaviour, (tuple, bytes)):
            raw = behaviour.__mro__[1]
            type.__setattr__(cls, "_make", classmethod(lambda c, data: raw.__new__(c, data)))
            type.__setattr__(cls, "__init__", lambda self, *a, **k: None)
        classes[name] = cls
        return cls

    for name, entry in api.items():
        if "." in name:
            continue
        if entry["kind"] == "enum":
            setattr(module, name, make_enum(name, entry))
        else:
            setattr(module, name, make_class(name))
    for name, entry in api.items():
        if "." in name:
            parent, child = name.split(".", 1)
            enum = make_enum(name, entry)
            target = getattr(module, parent)
            type.__setattr__(target, child, enum)
            if entry.get("export_values"):
                for value in entry["values"]:
                    type.__setattr__(target, value, getattr(enum, value))
    return module


# ------------------------------------------------------------------------------------------ cuda-python


class FakeCudart:
    """``cuda.bindings.runtime`` with host memory for device memory; strict against the real package."""

    SIMULATED = ("cudaGetDeviceCount", "cudaGetDeviceProperties", "cudaMalloc", "cudaFree", "cudaMallocHost",
                 "cudaFreeHost", "cudaHostAlloc", "cudaHostGetDevicePointer", "cudaMemcpyAsync", "cudaStreamCreate",
                 "cudaStreamDestroy", "cudaStreamSynchronize", "cudaGetErrorString", "cudaDriverGetVersion",
                 "cudaRuntimeGetVersion")

    def __init__(self, gpu: SimulatedGPU):
        from cuda.bindings import runtime as real

        self._real = real
        self._gpu = gpu
        self._mallocs = 0
        self._streams = gpu.streams
        # Pass calls to the real package only where its runtime cannot touch memory (no usable driver).
        self._real_is_inert = real.cudaGetDeviceCount()[0] != real.cudaError_t.cudaSuccess
        self.__name__ = "cuda.bindings.runtime"

    def __getattr__(self, name):
        real_attr = getattr(self._real, name)  # AttributeError: the real package has no such name
        if not callable(real_attr) or isinstance(real_attr, type) or name not in self.SIMULATED:
            if callable(real_attr) and not isinstance(real_attr, type) and name.startswith("cuda") and \
                    name[4:5].isupper() and name not in self.SIMULATED:
                def unsimulated(*args, **kwargs):
                    raise NotImplementedError(f"the cuda-python stand-in does not simulate {name}")
                return unsimulated
            return real_attr
        signature = inspect.signature(real_attr)
        simulate = getattr(self, "_" + name)

        def call(*args, **kwargs):
            signature.bind(*args, **kwargs)  # TypeError: not the real function's parameters
            self._gpu.calls.append(name)
            result = simulate(*args, **kwargs)
            if self._real_is_inert:
                real_result = real_attr(*args, **kwargs)  # TypeError: argument types the real one rejects
                assert isinstance(real_result, tuple) and len(real_result) == len(result), (
                    f"{name}: the real function returns {real_result!r}, the stand-in {result!r}")
            return result

        return call

    # Results are built from the real package's own types.
    def _ok(self, *values):
        return (self._real.cudaError_t.cudaSuccess, *values)

    def _err(self, name, n_values):
        return (getattr(self._real.cudaError_t, name), *([None] * n_values))

    def _cudaGetDeviceCount(self):
        if self._gpu.device_count_error:
            return self._err(self._gpu.device_count_error, 1)
        return self._ok(1)

    def _cudaGetDeviceProperties(self, device):
        props = self._real.cudaDeviceProp()
        gpu = self._gpu
        props.major, props.minor = int(gpu.sm[2]), int(gpu.sm[3:])
        props.name = gpu.name.encode().ljust(256, b"\0")
        props.integrated = int(gpu.integrated)
        props.multiProcessorCount = gpu.multiprocessors
        props.canMapHostMemory = 1
        return self._ok(props)

    def _cudaMalloc(self, size):
        limit = self._gpu.malloc_fails_after
        if limit is not None and self._mallocs >= limit:
            return self._err("cudaErrorMemoryAllocation", 1)
        self._mallocs += 1
        return self._ok(self._gpu.alloc(size, "device"))

    def _cudaFree(self, devPtr):
        return self._ok() if self._gpu.free(devPtr, ("device",)) else self._err("cudaErrorInvalidValue", 0)

    def _cudaMallocHost(self, size):
        return self._ok(self._gpu.alloc(size, "pinned"))

    def _cudaHostAlloc(self, size, flags):
        mapped = int(flags) & int(self._real.cudaHostAllocMapped)
        return self._ok(self._gpu.alloc(size, "mapped" if mapped else "pinned"))

    def _cudaHostGetDevicePointer(self, pHost, flags):
        if self._gpu.kinds.get(int(pHost)) != "mapped":
            return self._err("cudaErrorInvalidValue", 1)
        return self._ok(int(pHost))  # unified addressing: the device sees mapped memory at the same address

    def _cudaFreeHost(self, ptr):
        return self._ok() if self._gpu.free(ptr, ("pinned", "mapped")) else self._err("cudaErrorInvalidValue", 0)

    def _cudaMemcpyAsync(self, dst, src, count, kind, stream):
        if int(self._stream_handle(stream)) not in self._streams:
            return self._err("cudaErrorInvalidResourceHandle", 0)
        expect = {self._real.cudaMemcpyKind.cudaMemcpyHostToDevice: (("pinned", "mapped"), ("device",)),
                  self._real.cudaMemcpyKind.cudaMemcpyDeviceToHost: (("device",), ("pinned", "mapped"))}[kind]
        n = int(count) // 4
        src_view, dst_view = self._gpu.view(int(src), n), self._gpu.view(int(dst), n)
        kinds = self._gpu.kinds
        src_kind = next(k for a, k in kinds.items() if a <= int(src) < a + ctypes.sizeof(self._gpu.allocations[a]))
        dst_kind = next(k for a, k in kinds.items() if a <= int(dst) < a + ctypes.sizeof(self._gpu.allocations[a]))
        if src_kind not in expect[0] or dst_kind not in expect[1]:
            return self._err("cudaErrorInvalidValue", 0)
        dst_view[:] = src_view
        return self._ok()

    def _stream_handle(self, stream):
        from cuda.bindings.utils import get_cuda_native_handle

        return get_cuda_native_handle(stream)

    def _cudaStreamCreate(self):
        stream = self._real.cudaStream_t(self._gpu.alloc(8, "stream"))
        self._streams.add(int(self._stream_handle(stream)))
        return self._ok(stream)

    def _cudaStreamDestroy(self, stream):
        handle = int(self._stream_handle(stream))
        if handle not in self._streams:
            return self._err("cudaErrorInvalidResourceHandle", 0)
        self._streams.discard(handle)
        self._gpu.free(handle, ("stream",))
        return self._ok()

    def _cudaStreamSynchronize(self, stream):
        return self._ok() if int(self._stream_handle(stream)) in self._streams else \
            self._err("cudaErrorInvalidResourceHandle", 0)

    def _cudaGetErrorString(self, error):
        return self._real.cudaGetErrorString(error)

    def _cudaDriverGetVersion(self):
        return self._ok(0 if self._gpu.device_count_error == "cudaErrorInsufficientDriver" else 12060)

    def _cudaRuntimeGetVersion(self):
        return self._real.cudaRuntimeGetVersion()
