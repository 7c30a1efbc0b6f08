"""A detector whose model runs on a Triton server: frames in, :class:`~pcedge.runtime.detector.Result` out.

:class:`RemoteDetector` has the local :class:`~pcedge.runtime.detector.Detector`'s interface for running
frames (``run_frames``, ``embed`` + ``score_embeddings`` for the watch pipeline, ``normalise_map``,
``geometry``, ``threshold``, ``description``), so ``pcedge predict`` and ``pcedge watch`` write the same
JSONL, overlays and summaries either way.

Division of work: the client decodes and fits the geometry (exactly the local detector's
``fit_geometry``), sends the network input ``[B, 3, H, W]`` float32 to the bundle's ensemble and maps the
returned network-resolution anomaly map back into its frame with the placement it kept; the server runs
the backbone, the index, Eq. 6-7 and the map. The geometry and threshold come from the ensemble's
``parameters["pcedge"]`` (written by :mod:`.repository`), so the client needs no bundle.

Timings: ``preprocess_ms`` is the client's geometry, ``backbone_ms`` the whole server round trip (network,
queueing, backbone, index, scoring), ``scoring_ms`` placing the map into the frame.

Failures: a request the server rejects (wrong shape or type, unknown model, a model error) raises
:class:`RemoteError` at once. A server that cannot be reached (restarting, network down) is retried with
exponential backoff for up to ``retry_s``, each retry on a fresh connection; then
:class:`ServerUnavailable`. After that the next call tries once before giving up, so a long run against a
dead server fails each frame quickly instead of waiting ``retry_s`` per frame.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..bundle import Geometry
from ..detector import Result, StageTimings
from ..preprocess import Placement, fit_geometry, to_tensor
from ..scoring import normalise

#: Outputs requested from the ensemble (see repository.OUTPUTS).
OUTPUT_NAMES = ("SCORE", "NORMALISED", "ANOMALOUS", "THRESHOLD", "S_STAR", "RESCORED", "PATCH_SCORES", "ANOMALY_MAP")
#: Server answers that mean "not now" rather than "never": retried like a refused connection.
_TRANSIENT = ("unavailable", "not ready", "is stopping", "shutting down", "503", "502", "connection")


class RemoteError(RuntimeError):
    """The server answered, but rejected the request; the message is the server's, prefixed by the URL."""


class ServerUnavailable(RuntimeError):
    """The server could not be reached within the retry window."""


@dataclass
class ClientOptions:
    timeout_s: float = 60.0  # one request, network and server included
    retry_s: float = 30.0  # how long to keep retrying an unreachable server before giving up
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 4.0
    threshold: float | None = None  # overrides the bundle's threshold for the verdict and normalisation


@dataclass
class ServerOutputs:
    """One batch's server outputs (what ``embed`` hands ``score_embeddings`` in the watch pipeline)."""

    arrays: dict[str, np.ndarray] = field(repr=False)  # output name -> [B, ...]
    round_trip_ms: float = 0.0

    def __len__(self) -> int:
        return int(self.arrays["SCORE"].shape[0])


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port`` / ``grpc://host:port`` / ``host:port`` (HTTP) -> (protocol, "host:port")."""
    url = url.strip().rstrip("/")
    protocol, sep, rest = url.partition("://")
    if not sep:
        protocol, rest = "http", url
    protocol = protocol.lower()
    if protocol not in ("http", "grpc"):
        raise ValueError(f"--server {url}: the scheme must be http:// or grpc://, got {protocol}://")
    host, _, port = rest.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in rest:
        raise ValueError(f"--server {url}: expected [http://|grpc://]HOST:PORT")
    return protocol, rest


def _modules(protocol: str):
    try:
        from tritonclient.utils import InferenceServerException

        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
    except ImportError as exc:
        raise ServerUnavailable(f"talking to a Triton server needs tritonclient ({exc}); "
                                "install pcedge's serving extra: pip install 'pcedge[serve]'") from exc
    return client, InferenceServerException


class RemoteDetector:
    """``RemoteDetector(url, model)``: the model ``model`` (a bundle's ensemble) on the server at ``url``.

    Thread-safe: each thread gets its own connection (tritonclient's HTTP client is not shared across
    threads). Opening waits (with the same retry policy) until the model is ready and reads its parameters.
    """

    def __init__(self, url: str, model: str, options: ClientOptions | None = None):
        self.url = url
        self.model = model
        self.options = options or ClientOptions()
        self.protocol, self.address = parse_url(url)
        self._client_module, self._server_exception = _modules(self.protocol)
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self._down = False  # the last call gave up on the server: try once, then fail fast
        self.reconnects = 0  # fresh connections made after a failure (for the summary)
        self.retries = 0  # requests sent again after a transient failure
        params = self._call(self._read_parameters)
        self.geometry = Geometry(**params["geometry"])
        self.grid = tuple(params["grid"])
        self.server_threshold = float(params["threshold"])
        self.scale = float(params["scale"]) if params["scale"] > 0 else 1.0
        self.threshold = float(self.options.threshold if self.options.threshold is not None else self.server_threshold)
        self.max_batch = max(1, int(self._max_batch))
        self.description = (f"Triton server {self.protocol}://{self.address} model {model} "
                            f"({params.get('backbone', '?')}, memory bank {params.get('memory_bank', '?')})")

    # ---------------------------------------------------------------- connection
    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            kwargs = {"network_timeout": self.options.timeout_s, "connection_timeout": self.options.timeout_s} \
                if self.protocol == "http" else {}
            client = self._client_module.InferenceServerClient(self.address, **kwargs)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _reset_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self.reconnects += 1

    def _transient(self, exc: BaseException) -> bool:
        if not isinstance(exc, self._server_exception):
            return True  # refused/reset connection, timeout, DNS: the server is not there (yet)
        text = f"{exc.status()} {exc.message()}".lower()
        return any(word in text for word in _TRANSIENT)

    def _call(self, function):
        """``function(client)`` with retries on transient failures (see the module docstring)."""
        deadline = time.monotonic() + (0.0 if self._down else self.options.retry_s)
        delay = self.options.backoff_initial_s
        while True:
            try:
                result = function(self._client())
                self._down = False
                return result
            except RemoteError:
                raise
            except Exception as exc:
                if not self._transient(exc):
                    raise RemoteError(f"{self.url} model {self.model}: {_message(exc)}") from exc
                self._reset_client()
                if time.monotonic() + delay > deadline:
                    self._down = True
                    raise ServerUnavailable(f"{self.url}: server unreachable for {self.options.retry_s:.0f} s "
                                            f"({_message(exc)})") from exc
                time.sleep(delay)
                self.retries += 1
                delay = min(delay * 2, self.options.backoff_max_s)

    def _read_parameters(self, client) -> dict:
        if not client.is_model_ready(self.model):
            if self.model not in _model_names(client, self.protocol):
                raise RemoteError(f"{self.url}: no model {self.model!r} on this server "
                                  f"(it serves: {', '.join(_model_names(client, self.protocol)) or 'nothing'})")
            raise ConnectionError(f"model {self.model} is not ready yet")
        config = client.get_model_config(self.model)
        if self.protocol == "grpc":
            config = json.loads(_grpc_config_json(config))
        else:
            config = config.get("config", config) if isinstance(config, dict) else config
        raw = config.get("parameters", {}).get("pcedge", {})
        text = raw.get("string_value") or raw.get("stringValue")
        if not text:
            raise RemoteError(f"{self.url}: model {self.model!r} is not a pcedge ensemble (no 'pcedge' parameter "
                              "in its config); serve a repository written by pcedge triton")
        self._max_batch = int(config.get("max_batch_size", config.get("maxBatchSize", 1)) or 1)
        return json.loads(text)

    # ---------------------------------------------------------------- inference
    def _infer(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        module = self._client_module

        def request(client):
            image = module.InferInput("IMAGES", list(tensor.shape), "FP32")
            image.set_data_from_numpy(tensor)
            if self.protocol == "http":
                outputs = [module.InferRequestedOutput(name, binary_data=True) for name in OUTPUT_NAMES]
                response = client.infer(self.model, [image], outputs=outputs)
            else:
                outputs = [module.InferRequestedOutput(name) for name in OUTPUT_NAMES]
                response = client.infer(self.model, [image], outputs=outputs, client_timeout=self.options.timeout_s)
            return {name: response.as_numpy(name) for name in OUTPUT_NAMES}

        return self._call(request)

    def embed(self, tensor: np.ndarray) -> ServerOutputs:
        """Network batch ``[B, 3, H, W]`` -> the server's outputs for it (sent in chunks of max_batch)."""
        tensor = np.ascontiguousarray(tensor, dtype=np.float32)
        t0 = time.perf_counter()
        parts = [self._infer(tensor[i : i + self.max_batch]) for i in range(0, tensor.shape[0], self.max_batch)]
        arrays = {name: np.concatenate([p[name] for p in parts]) for name in OUTPUT_NAMES}
        return ServerOutputs(arrays, (time.perf_counter() - t0) * 1e3)

    def score_embeddings(self, outputs: ServerOutputs, placements: list[Placement],
                         sources: list[str | None] | None = None) -> list[Result]:
        """The server's outputs -> :class:`Result` per image, maps placed back into each original frame."""
        a = outputs.arrays
        B = len(outputs)
        sources = sources or [None] * B
        results = []
        for b in range(B):
            t = time.perf_counter()
            score = float(a["SCORE"][b, 0])
            if self.options.threshold is None:
                threshold, normalised = float(a["THRESHOLD"][b, 0]), float(a["NORMALISED"][b, 0])
                anomalous = bool(a["ANOMALOUS"][b, 0])
            else:
                threshold = self.threshold
                normalised = float(normalise(score, threshold, self.scale))
                anomalous = score > threshold
            full_map = placements[b].to_original(a["ANOMALY_MAP"][b])
            results.append(Result(
                score=score, normalised=normalised, anomalous=anomalous, threshold=threshold,
                anomaly_map=full_map, patch_scores=a["PATCH_SCORES"][b], s_star=float(a["S_STAR"][b, 0]),
                n_rescored=int(a["RESCORED"][b, 0]),
                timings=StageTimings(backbone_ms=outputs.round_trip_ms / B, scoring_ms=(time.perf_counter() - t) * 1e3),
                source=sources[b],
            ))
        return results

    def run_frames(self, frames: list[np.ndarray], sources: list[str | None] | None = None,
                   decode_ms: float = 0.0) -> list[Result]:
        """Decoded OpenCV frames -> results, as :meth:`Detector.run_frames` (geometry here, the rest remote)."""
        if not frames:
            return []
        sources = sources or [None] * len(frames)
        t0 = time.perf_counter()
        fitted = [fit_geometry(f, self.geometry, s or "<array>") for f, s in zip(frames, sources)]
        tensor = to_tensor([f[0] for f in fitted])
        preprocess_ms = (time.perf_counter() - t0) * 1e3 / len(frames)
        results = self.score_embeddings(self.embed(tensor), [f[1] for f in fitted], sources)
        for r in results:
            r.timings.decode_ms = decode_ms
            r.timings.preprocess_ms = preprocess_ms
        return results

    def normalise_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        return normalise(anomaly_map, self.threshold, self.scale).astype(np.float32)

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # closing a connection to a server that is gone
                pass

    def __enter__(self) -> "RemoteDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _message(exc: BaseException) -> str:
    message = getattr(exc, "message", None)
    text = message() if callable(message) else str(exc)
    return (text or type(exc).__name__).strip()


def _model_names(client, protocol: str) -> list[str]:
    index = client.get_model_repository_index()
    if protocol == "grpc":
        return sorted(m.name for m in index.models)
    return sorted(m["name"] for m in index)


def _grpc_config_json(response) -> str:
    from google.protobuf import json_format

    return json_format.MessageToJson(response.config, preserving_proto_field_name=True)
