"""PatchEmbedder (Roth et al. 2022 §3.1) and its ONNX export: shapes, the aggregation computed by hand,
and torch/ONNX Runtime parity on real fixture images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from pcedge.export.backbones import build_backbone
from pcedge.export.embedder import PatchEmbedder, adaptive_pool_matrix
from pcedge.export.onnx_export import ParityError, assert_parity, check_parity, export_onnx
from pcedge.runtime.bundle import Geometry, ParityReport
from pcedge.runtime.preprocess import fit_geometry, list_images, read_image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
MIN_COSINE = 0.9999
REL_TOL = 1e-3


def fixture_batch(height: int, width: int, n_per_set: int = 2) -> np.ndarray:
    """Real images from both fixture sets (train/good and a defect folder) -> ``[n, 3, H, W]`` float32."""
    folders = [FIXTURES / "ball_screw_drive" / "train" / "good", FIXTURES / "ball_screw_drive" / "test" / "pitting",
               FIXTURES / "pcb" / "train" / "good"]
    geometry = Geometry(mode="stretch", height=height, width=width)
    images = [fit_geometry(read_image(p), geometry)[0] for folder in folders for p in list_images(folder)[:n_per_set]]
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)


@pytest.fixture(scope="module")
def lite0() -> PatchEmbedder:
    return PatchEmbedder(build_backbone("efficientnet_lite0"))


@pytest.fixture(scope="module")
def lite0_onnx(lite0, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "lite0.onnx"
    export_onnx(lite0, path, 224, 224)
    return path


@pytest.fixture(scope="module")
def resnet18_onnx(tmp_path_factory) -> tuple[PatchEmbedder, Path]:
    embedder = PatchEmbedder(build_backbone("resnet18", random_weights=True, input_hw=(128, 128), seed=0))
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    export_onnx(embedder, path, 128, 128)
    return embedder, path


# ------------------------------------------------------------------------------------------------ torch


def test_output_shape_and_properties(lite0):
    with torch.no_grad():
        out = lite0(torch.from_numpy(fixture_batch(224, 224, n_per_set=1)[:2]))
    assert list(out.shape) == [2, 784, 152] and out.dtype == torch.float32
    assert lite0.dim == 152 and lite0.stride == 8
    assert lite0.grid(224, 224) == (28, 28) and lite0.grid(256, 320) == (32, 40)


@pytest.mark.parametrize("channels, dim", [(152, 64), (152, 100), (152, 152), (1536, 1024), (384, 7)])
def test_projection_matrix_equals_adaptive_avg_pool1d(channels, dim):
    x = torch.randn(5, 11, channels)
    expected = F.adaptive_avg_pool1d(x.reshape(-1, 1, channels), dim).reshape(5, 11, dim)
    assert torch.allclose(x @ adaptive_pool_matrix(channels, dim), expected, atol=1e-5)


def test_projected_embedder_pools_the_channels(lite0):
    projected = PatchEmbedder(lite0.backbone, projection_dim=100)
    images = torch.from_numpy(fixture_batch(224, 224, n_per_set=1)[:1])
    with torch.no_grad():
        full, out = lite0(images), projected(images)
    assert projected.dim == 100 and list(out.shape) == [1, 784, 100]
    expected = F.adaptive_avg_pool1d(full.reshape(-1, 1, 152), 100).reshape(1, 784, 100)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def _neighbourhood_mean(feature: np.ndarray, y: int, x: int, border: str = "zero") -> np.ndarray:
    """Eq. 1-2 with p = 3 by hand at ``(y, x)`` of ``feature [C, h, w]``, the border filled as ``border`` says.

    zero: the sum of the real neighbours over 9 (padding zeros counted, as patchcore-inspection's unfold and
    anomalib's AvgPool2d(3, 1, 1) do); mean: the mean of the real neighbours; reflect: the map mirrored at
    its edge (index -1 -> 1, h -> h - 2).
    """
    _, height, width = feature.shape
    if border == "reflect":
        def mirror(i, n):
            return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
        return np.mean([feature[:, mirror(yy, height), mirror(xx, width)]
                        for yy in range(y - 1, y + 2) for xx in range(x - 1, x + 2)], axis=0)
    ys, xs = range(max(y - 1, 0), min(y + 2, height)), range(max(x - 1, 0), min(x + 2, width))
    real = [feature[:, yy, xx] for yy in ys for xx in xs]
    return np.sum(real, axis=0) / 9.0 if border == "zero" else np.mean(real, axis=0)


def _bilinear_2x(aggregated, y: int, x: int, size: int) -> np.ndarray:
    """Half-pixel bilinear sample of a ``size x size`` map at output position (y, x) of the 2x grid."""
    def axis(i):
        source = max((i + 0.5) / 2 - 0.5, 0.0)  # half-pixel centres, clamped at the border like torch
        low = int(np.floor(source))
        return low, min(low + 1, size - 1), source - low
    y0, y1, wy = axis(y)
    x0, x1, wx = axis(x)
    return ((1 - wy) * (1 - wx) * aggregated(y0, x0) + (1 - wy) * wx * aggregated(y0, x1)
            + wy * (1 - wx) * aggregated(y1, x0) + wy * wx * aggregated(y1, x1))


@pytest.mark.parametrize("border", ["zero", "mean", "reflect"])
def test_patch_embedding_equals_hand_computation(lite0, border):
    embedder = lite0 if border == "zero" else PatchEmbedder(lite0.backbone, border=border)
    images = torch.from_numpy(fixture_batch(224, 224, n_per_set=1)[:1])
    with torch.no_grad():
        level2, level3 = (t[0].double().numpy() for t in embedder.backbone(images))
        embeddings = embedder(images)[0].double().numpy()
    for y, x in [(0, 0), (5, 17), (27, 27), (13, 0), (27, 4)]:
        expected = np.concatenate([
            _neighbourhood_mean(level2, y, x, border),
            _bilinear_2x(lambda yy, xx: _neighbourhood_mean(level3, yy, xx, border), y, x, size=14),
        ])
        got = embeddings[y * 28 + x]
        assert np.allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max()), (border, y, x)


def test_default_border_counts_the_zero_padding(lite0):
    """The default is the paper's code: a corner patch of a constant map is 4/9 of it, an interior one all."""
    assert lite0.border == "zero"
    ones = torch.ones(1, 2, 6, 6)
    out = lite0.aggregate(ones)[0, 0]
    assert out[0, 0].item() == pytest.approx(4 / 9) and out[0, 3].item() == pytest.approx(6 / 9)
    assert out[3, 3].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="border 'nearest': expected one of zero, mean, reflect"):
        PatchEmbedder(lite0.backbone, border="nearest")


def test_sides_must_be_multiples_of_16(lite0):
    with pytest.raises(ValueError, match="multiples of 16"):
        lite0.grid(224, 200)
    resnet = PatchEmbedder(build_backbone("resnet18", random_weights=True))
    with pytest.raises(ValueError, match="200x232: both sides must be positive multiples of 16"):
        resnet(torch.zeros(1, 3, 200, 232))
    with pytest.raises(ValueError, match="multiples of 16"):
        export_onnx(resnet, "/nonexistent/never_written.onnx", 120, 128)


# ------------------------------------------------------------------------------------------------ ONNX


def test_lite0_graph_is_static_except_batch(lite0_onnx):
    model = onnx.load(str(lite0_onnx))
    assert not any(p.suffix != ".onnx" for p in lite0_onnx.parent.iterdir()), "no external data, no temp files"
    ops = {node.op_type for node in model.graph.node}
    assert not ops & {"Shape", "Gather", "ConstantOfShape", "Slice"}, f"shape arithmetic leaked into the graph: {ops}"
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    symbolic = {d.dim_param for v in list(inferred.graph.value_info) + list(inferred.graph.output)
                for d in v.type.tensor_type.shape.dim if not d.HasField("dim_value")}
    assert symbolic == {"batch"}
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "images" and out.name == "embeddings"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 784, 152]


def test_lite0_parity_on_fixture_images(lite0, lite0_onnx):
    report = check_parity(lite0, lite0_onnx, fixture_batch(224, 224))
    assert report.n_images == 6
    assert report.max_rel_error <= REL_TOL and report.min_cosine >= MIN_COSINE, report
    assert_parity(report)


def test_dynamic_batch_runs_in_onnxruntime(lite0, lite0_onnx):
    session = ort.InferenceSession(str(lite0_onnx), providers=["CPUExecutionProvider"])
    images = fixture_batch(224, 224, n_per_set=1)
    single = session.run(["embeddings"], {"images": images[:1]})[0]
    triple = session.run(["embeddings"], {"images": images[:3]})[0]
    assert single.shape == (1, 784, 152) and triple.shape == (3, 784, 152)
    assert np.allclose(triple[0], single[0], rtol=1e-4, atol=1e-5)  # batching does not change a result


@pytest.mark.parametrize("border", ["mean", "reflect"])
def test_other_borders_export_with_parity(lite0, border, tmp_path):
    embedder = PatchEmbedder(lite0.backbone, border=border)
    path = tmp_path / f"lite0-{border}.onnx"
    export_onnx(embedder, path, 224, 224)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Shape", "Gather", "ConstantOfShape"}, ops
    report = check_parity(embedder, path, fixture_batch(224, 224, n_per_set=1))
    assert report.max_rel_error <= REL_TOL and report.min_cosine >= MIN_COSINE, report


def test_resnet18_parity(resnet18_onnx):
    embedder, path = resnet18_onnx
    report = check_parity(embedder, path, fixture_batch(128, 128))
    assert report.max_rel_error <= REL_TOL and report.min_cosine >= MIN_COSINE, report


def test_wide_resnet50_2_parity(tmp_path):
    embedder = PatchEmbedder(build_backbone("wide_resnet50_2", random_weights=True, input_hw=(128, 128)))
    path = tmp_path / "wrn50.onnx"
    export_onnx(embedder, path, 128, 128)
    report = check_parity(embedder, path, fixture_batch(128, 128, n_per_set=1))
    assert report.n_images == 3 and report.max_rel_error <= REL_TOL and report.min_cosine >= MIN_COSINE, report


def test_mismatched_model_raises_parity_error(resnet18_onnx):
    _, path = resnet18_onnx
    other = PatchEmbedder(build_backbone("resnet18", random_weights=True, input_hw=(128, 128), seed=1))
    report = check_parity(other, path, fixture_batch(128, 128, n_per_set=1))
    assert report.max_rel_error > REL_TOL and report.min_cosine < MIN_COSINE
    with pytest.raises(ParityError, match=r"max relative error .* > 0.001 .*min patch cosine"):
        assert_parity(report)


def test_assert_parity_refuses_nan():
    with pytest.raises(ParityError):
        assert_parity(ParityReport(n_images=1, max_abs_diff=float("nan"), max_rel_error=float("nan"), min_cosine=0.0))
