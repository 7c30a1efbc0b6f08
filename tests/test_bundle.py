"""The bundle contract: exported on real fixture images, verified on open, refused when tampered."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pcedge.runtime.bundle import SCHEMA_VERSION, BundleError, BundleWriter, Manifest, open_bundle


def test_export_writes_a_complete_verified_bundle(fixture_report):
    bundle = open_bundle(fixture_report.bundle)  # verifies every checksum
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert {"model.onnx", "memory_bank.npy", "index.hnsw", "check/images.npy", "check/embeddings.npy",
            "check/scores.npy"} <= set(m.files)
    assert m.model.backbone == "efficientnet_lite0" and m.model.layer_channels == [40, 112]
    assert m.output.dim == 152 and (m.output.grid_h, m.output.grid_w) == (28, 28)
    bank = bundle.load_memory_bank()
    assert bank.shape == (m.memory_bank.n, 152) and bank.dtype == np.float32
    # The coreset is the configured fraction of every patch feature of the kept training images.
    assert m.memory_bank.n_features_total == fixture_report.n_train_images * 784
    from pcedge.export.fit import DEFAULT_CORESET

    assert m.memory_bank.n == pytest.approx(DEFAULT_CORESET * m.memory_bank.n_features_total, abs=1)
    assert m.memory_bank.coverage_radius > 0
    assert m.model.parity.max_rel_error <= 1e-3 and m.model.parity.min_cosine > 0.9999
    assert m.threshold.value > 0 and m.threshold.n_images == fixture_report.n_val_images >= 3
    assert "huggingface" not in m.model.weights and "efficientnet" in m.model.weights


def test_tampered_byte_is_refused_naming_the_file(fixture_bundle, tmp_path):
    copy = tmp_path / "copy.pcedge"
    shutil.copytree(fixture_bundle, copy)
    path = copy / "memory_bank.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one feature value, same size
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="memory_bank.npy: sha256 does not match"):
        open_bundle(copy)


def test_missing_file_and_newer_schema_are_refused(fixture_bundle, tmp_path):
    copy = tmp_path / "copy.pcedge"
    shutil.copytree(fixture_bundle, copy)
    (copy / "index.hnsw").unlink()
    with pytest.raises(BundleError, match="index.hnsw: listed in the manifest but missing"):
        open_bundle(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer than this pcedge reads"):
        open_bundle(copy)
    with pytest.raises(BundleError, match="no such bundle directory"):
        open_bundle(tmp_path / "absent.pcedge")


def test_writer_leaves_nothing_behind_on_failure_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "x.pcedge"
    with pytest.raises(RuntimeError):
        with BundleWriter(target) as writer:
            np.save(writer.path("memory_bank.npy"), np.zeros((2, 2), np.float32))
            raise RuntimeError("crash mid-export")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with BundleWriter(target) as writer:
        writer.path("model.onnx").write_bytes(b"x")
        writer.path("memory_bank.npy").write_bytes(b"y")
        writer.commit(Manifest())
    with pytest.raises(FileExistsError, match="pass --force"):
        BundleWriter(target)
    with BundleWriter(target, force=True) as writer:
        writer.path("model.onnx").write_bytes(b"z")
        writer.path("memory_bank.npy").write_bytes(b"w")
        writer.commit(Manifest())
    assert (target / "model.onnx").read_bytes() == b"z"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pcedge"]  # no temp or old copies left


def test_manifest_round_trip_and_unknown_keys():
    m = Manifest()
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    data = json.loads(m.to_json())
    data["model"]["bogus"] = 1
    with pytest.raises(BundleError, match="unknown keys"):
        Manifest.from_dict(data)
