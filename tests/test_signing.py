"""Signed bundles (issue 11, item 3): `pcedge sign`, `unpack --trust`, and the runtime's trusted key.

Real Ed25519 keys from the `cryptography` package (the `sign` extra, also in the `test` extra), real
exported/tiny bundles and real archives.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest
from test_engines import write_tiny_bundle

from pcedge import cli
from pcedge.runtime.archive import ArchiveError, pack, unpack
from pcedge.runtime.bundle import BundleError, EngineSpec, open_bundle
from pcedge.runtime.detector import Detector
from pcedge.runtime.signing import SIGNATURE, generate_key, key_id, load_public_key, sign_manifest
from pcedge.runtime.tensorrt import engines


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    fleet, fleet_pub = generate_key(root / "fleet.key")
    other, other_pub = generate_key(root / "other.key")
    return {"fleet": fleet, "fleet_pub": fleet_pub, "other": other, "other_pub": other_pub}


@pytest.fixture
def signed_tiny(tmp_path, keys) -> Path:
    root = write_tiny_bundle(tmp_path / "tiny.pcedge")
    sign_manifest(root / "manifest.json", keys["fleet"])
    return root


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generated_private_key_is_private_and_never_overwritten(keys, tmp_path, capsys):
    assert stat.S_IMODE(keys["fleet"].stat().st_mode) == 0o600
    assert key_id(load_public_key(keys["fleet_pub"])) != key_id(load_public_key(keys["other_pub"]))
    before = keys["fleet"].read_bytes()
    code, _, err = run_cli(["sign", "--generate-key", str(keys["fleet"])], capsys)
    assert code == 2 and "already exists; a key file is never overwritten" in err
    assert keys["fleet"].read_bytes() == before
    code, out, _ = run_cli(["sign", "--generate-key", str(tmp_path / "new.key")], capsys)
    assert code == 0 and f"wrote       {tmp_path / 'new.key.pub'}" in out


def test_trusted_key_accepts_its_signature_and_refuses_unsigned_other_and_edited(signed_tiny, keys, tmp_path):
    assert open_bundle(signed_tiny, trust=keys["fleet_pub"]).manifest.memory_bank.n == 10

    with pytest.raises(BundleError, match=r"signed by key [0-9a-f]{16}, not by the trusted key [0-9a-f]{16}"):
        open_bundle(signed_tiny, trust=keys["other_pub"])

    unsigned = write_tiny_bundle(tmp_path / "unsigned.pcedge")
    with pytest.raises(BundleError, match=r"manifest.sig: missing: the bundle is unsigned"):
        open_bundle(unsigned, trust=keys["fleet_pub"])
    open_bundle(unsigned)  # without a trusted key signatures are optional

    manifest = signed_tiny / "manifest.json"
    data = json.loads(manifest.read_text())
    data["threshold"]["value"] = 1e9  # "never alarm": the manifest has no checksum of its own, the signature covers it
    manifest.write_text(json.dumps(data, indent=2))
    with pytest.raises(BundleError, match=r"the signature does not match manifest.json: the manifest was changed after signing"):
        open_bundle(signed_tiny, trust=keys["fleet_pub"])


def test_a_replaced_file_with_recomputed_checksum_fails_the_signature(signed_tiny, keys):
    import hashlib

    bank = signed_tiny / "memory_bank.npy"
    content = bank.read_bytes()[:-4] + b"\0\0\0\0"
    bank.write_bytes(content)
    data = json.loads((signed_tiny / "manifest.json").read_text())
    data["files"]["memory_bank.npy"]["sha256"] = hashlib.sha256(content).hexdigest()
    (signed_tiny / "manifest.json").write_text(json.dumps(data, indent=2))
    open_bundle(signed_tiny)  # checksums alone are satisfied: they catch accidents, not intent
    with pytest.raises(BundleError, match="the signature does not match"):
        open_bundle(signed_tiny, trust=keys["fleet_pub"])


def test_engines_built_on_the_device_keep_the_signature_valid(signed_tiny, keys):
    orin = engines.DeviceInfo(sm="sm87", name="Orin", trt_version="10.3.0", fast_fp16=True, integrated=True,
                              multiprocessors=16)
    rel = engines.engine_filename(orin, "fp16")
    (signed_tiny / rel).parent.mkdir()
    (signed_tiny / rel).write_bytes(b"plan built on an Orin")
    engines.record_engine(open_bundle(signed_tiny), EngineSpec(file=rel, sm="sm87", trt_version="10.3.0", precision="fp16",
                                                                device_name="Orin", device_key=orin.key))
    bundle = open_bundle(signed_tiny, trust=keys["fleet_pub"])
    assert [e.file for e in bundle.manifest.engines] == [rel]


def test_signed_archive_round_trip_and_unpack_trust_refusals(signed_tiny, keys, tmp_path, capsys):
    archive = pack(signed_tiny, tmp_path / "tiny.tar.gz")
    with tarfile.open(archive, "r:gz") as tar:
        names = tar.getnames()
    assert names[:2] == ["tiny.pcedge/manifest.json", f"tiny.pcedge/{SIGNATURE}"]

    code, out, err = run_cli(["unpack", str(archive), str(tmp_path / "ok.pcedge"), "--trust", str(keys["fleet_pub"])], capsys)
    assert code == 0, err
    assert "signed by the trusted key" in out
    open_bundle(tmp_path / "ok.pcedge", trust=keys["fleet_pub"])

    code, _, err = run_cli(["unpack", str(archive), str(tmp_path / "no.pcedge"), "--trust", str(keys["other_pub"])], capsys)
    assert code == 2 and "not by the trusted key" in err and not (tmp_path / "no.pcedge").exists()

    unsigned = pack(write_tiny_bundle(tmp_path / "plain.pcedge"), tmp_path / "plain.tar.gz")
    with pytest.raises(ArchiveError, match=r"unsigned \(no manifest.sig after the manifest\); --trust refuses unsigned archives"):
        unpack(unsigned, tmp_path / "plain-copy.pcedge", trust=keys["fleet_pub"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []

    # An archive whose manifest was edited after signing (checksums inside still self-consistent).
    with tarfile.open(archive, "r:gz") as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    edited = tmp_path / "edited.tar.gz"
    with tarfile.open(edited, "w:gz") as tar:
        for info, data in members:
            if info.name.endswith("manifest.json"):
                manifest = json.loads(data)
                manifest["threshold"]["value"] = 1e9
                data = json.dumps(manifest).encode()
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="the signature does not match manifest.json"):
        unpack(edited, tmp_path / "edited.pcedge", trust=keys["fleet_pub"])


def test_runtime_setting_refuses_unsigned_bundles(fixture_bundle, keys, tmp_path, capsys):
    import shutil

    bundle = shutil.copytree(fixture_bundle, tmp_path / "b.pcedge")
    image = str(Path(__file__).resolve().parents[1] / "fixtures/ball_screw_drive/test/good")
    with pytest.raises(BundleError, match="unsigned"):
        Detector.open(bundle, trusted_key=keys["fleet_pub"])
    code, _, err = run_cli(["predict", str(bundle), image, "--trust", str(keys["fleet_pub"])], capsys)
    assert code == 2 and "manifest.sig: missing: the bundle is unsigned" in err

    code, out, err = run_cli(["sign", str(bundle), "--key", str(keys["fleet"])], capsys)
    assert code == 0, err
    assert f"wrote       {bundle / SIGNATURE}" in out
    with Detector.open(bundle, trusted_key=keys["fleet_pub"], index="exact") as detector:
        assert detector.manifest.memory_bank.n > 0
    code, out, _ = run_cli(["verify", str(bundle), "--trust", str(keys["other_pub"])], capsys)
    assert code == 1 and "FAIL  checksums" in out and "not by the trusted key" in out


def test_sign_command_needs_a_bundle_and_a_key(capsys, tmp_path):
    code, _, err = run_cli(["sign", str(tmp_path)], capsys)
    assert code == 2 and "give BUNDLE --key KEY" in err
    code, _, err = run_cli(["sign", str(tmp_path / "missing.pcedge"), "--key", str(tmp_path / "k")], capsys)
    assert code == 2 and err.startswith("pcedge sign: ")


def test_archive_keeps_the_signed_manifest_as_written_by_another_version(tmp_path, keys):
    """A bundle from a pcedge whose manifest lacked a field this version has (it takes its default): the
    archive carries the manifest as written, so the signature made over it still matches after unpacking."""
    root = write_tiny_bundle(tmp_path / "older.pcedge")
    data = json.loads((root / "manifest.json").read_text())
    del data["threshold"]["nominal_scores"], data["model"]["parity"]
    (root / "manifest.json").write_text(json.dumps(data, indent=2))
    sign_manifest(root / "manifest.json", keys["fleet"])
    archive = pack(root, tmp_path / "older.tar.gz")
    dest = unpack(archive, tmp_path / "device.pcedge", trust=keys["fleet_pub"])
    assert "nominal_scores" not in json.loads((dest / "manifest.json").read_text())["threshold"]
    assert open_bundle(dest, trust=keys["fleet_pub"]).manifest.threshold.nominal_scores == []
