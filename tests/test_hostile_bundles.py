"""Hostile and malformed bundles (issue 11, items 1, 2, 10, 13): refused with a message naming the file and
the field, rebuilt where the bundle holds the source of truth; never a traceback, never a signal.

Every bundle here is a copy of a real exported fixture bundle with one thing changed and, where the attack
needs it, its sha256 recomputed in the manifest (checksums catch accidents, not intent).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pcedge import cli
from pcedge.runtime.bundle import BundleError, open_bundle
from pcedge.runtime.detector import Detector
from pcedge.runtime.hnsw_format import HEADER, HnswFormatError, read_header, validate_hnsw_file
from pcedge.runtime.index import HnswIndex

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "fixtures/ball_screw_drive/test/pitting/01_200902053521_585000_090_crop_2.jpg"


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def rewrite(bundle: Path, edit=None, files: dict[str, bytes] | None = None, raw: str | None = None) -> Path:
    """Replace files, recompute their sha256 and size in the manifest (as an attacker would), then apply
    ``edit(manifest_dict)``; ``raw`` replaces the manifest text outright."""
    path = bundle / "manifest.json"
    if raw is not None:
        path.write_text(raw)
        return bundle
    data = json.loads(path.read_text())
    for rel, content in (files or {}).items():
        (bundle / rel).write_bytes(content)
        data["files"][rel] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    if edit is not None:
        edit(data)
    text = json.dumps(data, indent=2)  # json writes NaN as NaN: the hand-edited case
    path.write_text(text.replace('"__DEEP__"', '{"a": ' * 100_000 + "{}" + "}" * 100_000))
    return bundle


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    """A real `pcedge` process: a segfault shows as a negative return code (killed by the signal)."""
    env = dict(os.environ, PYTHONFAULTHANDLER="0")
    return subprocess.run([sys.executable, "-m", "pcedge.cli", *args], capture_output=True, text=True, env=env, timeout=300)


# --------------------------------------------------------------------------------------------------
# Item 1: a crafted index.hnsw
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A real hnswlib index (M=4: several levels) over 400 random rows."""
    bank = np.random.default_rng(3).standard_normal((400, 8), dtype=np.float32)
    path = tmp_path_factory.mktemp("hnsw") / "index.hnsw"
    HnswIndex.build(bank, M=4, ef_construction=40, threads=1).save(path)
    return path, bank


def _crafted(path: Path, tmp: Path, name: str, change) -> Path:
    data = bytearray(path.read_bytes())
    change(data, read_header(path))
    out = tmp / name
    out.write_bytes(bytes(data))
    return out


def _upper_block_offset(data: bytes, h) -> tuple[int, int]:
    """(element, byte offset of its level-1 block) of the first element with upper levels."""
    pos = HEADER.size + h.count * h.size_per_element
    for i in range(h.count):
        (size,) = struct.unpack_from("<I", data, pos)
        if size:
            return i, pos + 4
        pos += 4
    raise AssertionError("no element above level 0")


def test_valid_index_passes_and_loads(small_index):
    path, bank = small_index
    header = validate_hnsw_file(path, bank)
    assert header.count == 400 and header.max_level >= 1
    assert HnswIndex.load(path, bank).query(bank[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]


def _set_level0_id(data, h):
    struct.pack_into("<I", data, HEADER.size + 7 * h.size_per_element + 4, 0x7FFFFFF0)


def _set_level0_count(data, h):
    struct.pack_into("<H", data, HEADER.size + 3 * h.size_per_element, h.max_m0 + 1)


def _set_upper_id(data, h):
    _, offset = _upper_block_offset(data, h)
    struct.pack_into("<H", data, offset, 1)
    struct.pack_into("<I", data, offset + 4, 0x7FFFFFF0)


def _set_upper_count(data, h):
    _, offset = _upper_block_offset(data, h)
    struct.pack_into("<H", data, offset, h.max_m + 5)


def _set_entry_point(data, h):
    struct.pack_into("<I", data, 6 * 8 + 4, h.count + 10)  # enterpoint_node_ after six size_t and maxlevel_


def _set_label(data, h):
    struct.pack_into("<Q", data, HEADER.size + 2 * h.size_per_element + h.label_offset, 5)  # label 5 twice


def _truncate(data, h):
    del data[len(data) - 100 :]


def _mark_deleted(data, h):
    data[HEADER.size + 9 * h.size_per_element + 2] |= 0x01


@pytest.mark.parametrize(
    "change, message",
    [
        (_set_level0_id, r"element 7 links to id 2147483632 on level 0, but there are 400 elements"),
        (_set_level0_count, r"element 3 has 9 level-0 neighbours, at most 8 allowed"),
        (_set_upper_id, r"level-1 link points to id 2147483632"),
        (_set_upper_count, r"more than 4 neighbours on level 1"),
        (_set_entry_point, r"entry point 410 >= element count 400"),
        (_set_label, r"labels are not the bank rows 0..399"),
        (_truncate, r"(truncated|structure accounts for)"),
        (_mark_deleted, r"element 9 is marked deleted"),
    ],
    ids=["level0-id", "level0-count", "upper-id", "upper-count", "entry-point", "duplicate-label", "truncated", "deleted"],
)
def test_crafted_index_structures_are_refused_before_hnswlib(small_index, tmp_path, change, message):
    path, bank = small_index
    bad = _crafted(path, tmp_path, "bad.hnsw", change)
    with pytest.raises(HnswFormatError, match=message):
        validate_hnsw_file(bad, bank)


def _craft_bundle_index(fixture_bundle: Path, dest: Path) -> Path:
    """The issue's attack: neighbour ids 0x7ffffff0 on level 0, sha256 recomputed in the manifest."""
    bundle = copy_bundle(fixture_bundle, dest)
    data = bytearray((bundle / "index.hnsw").read_bytes())
    h = read_header(bundle / "index.hnsw")
    for element in range(0, h.count, 3):
        struct.pack_into("<I", data, HEADER.size + element * h.size_per_element + 4, 0x7FFFFFF0)
    return rewrite(bundle, files={"index.hnsw": bytes(data)})


def test_crafted_index_never_kills_predict_or_verify_by_a_signal(fixture_bundle, tmp_path):
    bundle = _craft_bundle_index(fixture_bundle, tmp_path / "crafted.pcedge")
    jsonl = tmp_path / "out.jsonl"
    predict = run_subprocess(["predict", str(bundle), str(IMAGE), "--index", "hnsw", "--jsonl", str(jsonl)])
    assert predict.returncode == 0, predict.stderr  # not -11 (SIGSEGV): the graph was rebuilt from the bank
    assert "index.hnsw: not a valid hnswlib index (element 0 links to id 2147483632" in predict.stderr
    assert "rebuilt" in predict.stderr
    record = json.loads(jsonl.read_text().splitlines()[0])
    with Detector.open(bundle, index="exact") as detector:  # the rebuilt graph scores as exact search does
        assert record["score"] == pytest.approx(detector(IMAGE).score, rel=1e-5)

    verify = run_subprocess(["verify", str(bundle)])
    assert verify.returncode >= 0, verify.stderr
    assert verify.returncode == 1 and "Traceback" not in verify.stdout + verify.stderr
    assert "FAIL  index file" in verify.stdout and "rebuilds the graph from memory_bank.npy" in verify.stdout
    assert "PASS  hnsw recall@1" in verify.stdout  # the recall checks ran on the rebuilt graph


def test_truncated_index_with_recomputed_checksum_is_rebuilt(fixture_bundle, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path / "cut.pcedge")
    rewrite(bundle, files={"index.hnsw": (bundle / "index.hnsw").read_bytes()[:-1000]})
    result = run_subprocess(["predict", str(bundle), str(IMAGE), "--index", "hnsw", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert "not a valid hnswlib index" in result.stderr


# --------------------------------------------------------------------------------------------------
# Item 2: every file the runtime reads is listed and checked; every path stays inside the bundle
# --------------------------------------------------------------------------------------------------


def test_an_index_dropped_from_the_file_list_is_refused(fixture_bundle, tmp_path):
    bundle = rewrite(copy_bundle(fixture_bundle, tmp_path / "b.pcedge"), edit=lambda d: d["files"].pop("index.hnsw"))
    with pytest.raises(BundleError, match=r"manifest.json: index.file: index.hnsw is not listed in files"):
        open_bundle(bundle)


def test_check_paths_outside_the_bundle_are_refused_and_verify_fails(fixture_bundle, tmp_path, capsys):
    copy_bundle(fixture_bundle, tmp_path / "other.pcedge")
    bundle = copy_bundle(fixture_bundle, tmp_path / "b.pcedge")

    def point_out(data):
        data["check"]["images"] = "../other.pcedge/check/images.npy"

    rewrite(bundle, edit=point_out)
    code, out, _ = run_cli(["verify", str(bundle)], capsys)
    assert code == 1 and "PASS:" not in out
    assert "FAIL  checksums" in out and "check.images: '../other.pcedge/check/images.npy' is not a plain relative path" in out


def test_a_listed_symlink_out_of_the_bundle_is_refused(fixture_bundle, tmp_path, capsys):
    outside = tmp_path / "outside.npy"
    shutil.copy(fixture_bundle / "check/scores.npy", outside)
    bundle = copy_bundle(fixture_bundle, tmp_path / "b.pcedge")
    (bundle / "check/scores.npy").unlink()
    (bundle / "check/scores.npy").symlink_to(outside)
    with pytest.raises(BundleError, match=r"check/scores.npy: resolves outside the bundle"):
        open_bundle(bundle, verify=False)
    code, _, err = run_cli(["info", str(bundle)], capsys)
    assert code == 2 and "resolves outside the bundle" in err


# --------------------------------------------------------------------------------------------------
# Item 10: one schema, validated on open, messages naming the field
# --------------------------------------------------------------------------------------------------


def _set(path: str, value):
    def edit(data):
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _deep(data):
    data["exporter"] = "__DEEP__"  # rewrite() puts an object nested 100000 deep here


MANIFEST_CASES = [
    (_set("threshold.value", "abc"), "threshold.value: expected a finite number, got 'abc'"),
    (_set("threshold.value", None), "threshold.value: expected a finite number, got None"),
    (_set("threshold.value", float("nan")), "threshold.value: expected a finite number, got nan"),
    (_set("threshold.value", 0.0), "threshold.value: must be a positive finite number, got 0.0"),
    (_set("output.grid_h", 27), "output.grid_h: 27 x stride 8 != input side 224"),
    (_set("output.shape", ["batch", 784, 99]), "output.shape: ['batch', 784, 99] does not match [batch, 784, 152]"),
    (_set("scoring.blur_sigma", 0), "scoring.blur_sigma: must be > 0, got 0.0"),
    (_set("scoring.reweight_b", 0), "scoring.reweight_b: must be in 1.."),
    (_set("input.geometry.height", 17), "input.geometry.height: 17 is not a positive multiple of the backbone stride 16"),
    (_set("input.geometry.mode", "zoom"), "input.geometry.mode: unknown mode 'zoom'"),
    (_set("index.ef", 0), "index.ef: must be >= 1, got 0"),
    (_set("index.M", "16"), "index.M: expected an integer, got '16'"),
    (_set("memory_bank.n", True), "memory_bank.n: expected an integer, got True"),
    (_set("input.shape", ["batch", 3, [224], 224]), "input.shape[2]: expected a number or string, got [224]"),
    (_deep, "nested too deeply to be a pcedge manifest"),
]


@pytest.mark.parametrize("edit, message", MANIFEST_CASES, ids=[m.split(":")[0] for _, m in MANIFEST_CASES])
def test_malformed_manifest_values_are_refused_by_every_command(fixture_bundle, tmp_path, capsys, edit, message):
    bundle = rewrite(copy_bundle(fixture_bundle, tmp_path / "b.pcedge"), edit=edit)
    with pytest.raises(BundleError) as caught:
        open_bundle(bundle)
    assert message in str(caught.value) and str(bundle / "manifest.json") in str(caught.value)
    for command in (["info", str(bundle)], ["predict", str(bundle), str(IMAGE)]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, out, _ = run_cli(["verify", str(bundle)], capsys)
    assert code == 1 and "FAIL  checksums" in out and message in out


def test_a_huge_manifest_is_refused_before_parsing(fixture_bundle, tmp_path):
    bundle = copy_bundle(fixture_bundle, tmp_path / "b.pcedge")
    with open(bundle / "manifest.json", "ab") as handle:
        handle.truncate(17 * 1024 * 1024)
    with pytest.raises(BundleError, match=r"manifest.json: 17825792 bytes; a manifest is at most 16777216 bytes"):
        open_bundle(bundle)


# --------------------------------------------------------------------------------------------------
# Item 13: verify reports a FAIL line naming the file for malformed check/ files and banks
# --------------------------------------------------------------------------------------------------


def _npy(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _bank(bundle: Path) -> np.ndarray:
    return np.load(bundle / "memory_bank.npy")


VERIFY_CASES = {
    "check-garbage": (lambda b: {"check/images.npy": b"\x93NUMPY garbage"}, "check/images.npy: not a readable .npy array"),
    "check-float64": (lambda b: {"check/scores.npy": _npy(np.load(b / "check/scores.npy").astype(np.float64))},
                      "check/scores.npy: expected a float32 array, found float64"),
    "check-shape": (lambda b: {"check/embeddings.npy": _npy(np.load(b / "check/embeddings.npy")[:, :10])},
                    "check/embeddings.npy: shape"),
    "check-nan": (lambda b: {"check/scores.npy": _npy(np.full_like(np.load(b / "check/scores.npy"), np.nan))},
                  "check/scores.npy: contains NaN or infinite values"),
    "bank-float64": (lambda b: {"memory_bank.npy": _npy(_bank(b).astype(np.float64))}, "memory_bank.npy: expected float32"),
    "bank-big-endian": (lambda b: {"memory_bank.npy": _npy(_bank(b).astype(">f4"))}, "memory_bank.npy: expected float32"),
    "bank-pickled": (lambda b: {"memory_bank.npy": _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)},
                     "memory_bank.npy: not a readable .npy array"),
}


@pytest.mark.parametrize("case", sorted(VERIFY_CASES))
def test_verify_reports_malformed_arrays_as_a_fail_line(fixture_bundle, tmp_path, capsys, case):
    make_files, message = VERIFY_CASES[case]
    bundle = copy_bundle(fixture_bundle, tmp_path / "b.pcedge")
    rewrite(bundle, files=make_files(bundle))
    code, out, err = run_cli(["verify", str(bundle)], capsys)
    assert code == 1, err
    fails = [line for line in out.splitlines() if line.startswith("FAIL  ")]
    assert len(fails) == 1 and message in fails[0] and str(bundle) in fails[0], out


def test_verify_reports_an_invalid_stored_ef(fixture_bundle, tmp_path, capsys):
    bundle = rewrite(copy_bundle(fixture_bundle, tmp_path / "b.pcedge"), edit=_set("index.ef", -5))
    code, out, _ = run_cli(["verify", str(bundle)], capsys)
    assert code == 1 and "FAIL  checksums" in out and "index.ef: must be >= 1, got -5" in out


def _leaf_fields(cls, prefix=""):
    """Every (dotted path, annotation) of the manifest dataclass tree that is not itself a dataclass."""
    import dataclasses
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, path + ".")
        else:
            yield path, tp


def test_every_manifest_field_is_type_checked_from_the_dataclass_tree():
    """No field is special-cased: a wrong-typed value anywhere in the tree is refused naming that field, so
    fields added later (with defaults) are validated without touching the schema."""
    from pcedge.runtime.bundle import Manifest

    fields = list(_leaf_fields(Manifest))
    assert len(fields) > 60  # the whole tree, not a hand-picked list
    for path, _ in fields:
        data = json.loads(Manifest().to_json())
        node = data
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = [[{"nested": "wrong type"}]]
        with pytest.raises(BundleError, match=rf"manifest.json: {re.escape(path)}(\[0\])*: expected"):
            Manifest.from_dict(data, source="manifest.json")
