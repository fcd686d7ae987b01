"""Untrusted inputs of ``volssl preprocess``: non-regular files, oversized headers and decompression
bombs, values that do not survive the float32 cast, missing Zarr chunks, broken geometry, malformed
dataset.json / labels, and workers that outlive a killed main process.

Tests that could hang without the fix (a named pipe blocks ``open``; an orphaned worker sleeps) run
the work in a subprocess with a timeout, so a regression fails instead of hanging the suite.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volssl.cli import main
from volssl.data.manifest import read_manifest
from volssl.data.preprocess import PreprocessPlan, preprocess
from volssl.data.quality import QualityRules
from volssl.data.readers import (
    VolumeError,
    default_max_voxels,
    discover,
    read_dataset_json,
    read_volume,
)

pytestmark = pytest.mark.timeout(300)  # a regression fails instead of hanging
NO_RULES = QualityRules(min_fov_mm=None, max_spacing_mm=None, min_file_bytes=None)
PLAN = PreprocessPlan(rules=NO_RULES, target_spacing=None)
SRC_ROOT = Path(__file__).resolve().parents[2] / "src"


def _nifti(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


def _blob(shape=(12, 11, 10), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


def _python(code: str, timeout: float, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (volssl importable); TimeoutExpired fails the test."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _rules(report: dict) -> dict[str, list[str]]:
    return {e["id"]: [p["rule"] for p in e["problems"]] for e in report["excluded"]}


# ---------------------------------------------------------------------------------------------- 1. regular files


@pytest.mark.timeout(300)
def test_named_pipes_and_link_loops_are_never_opened(tmp_path):
    """FIFOs called x.tif / x.mha / x.nii.gz / x.zarr and a link loop a -> b -> a, in a plain folder and in
    an nnU-Net dataset: each is excluded with its reason, every good file next to them is processed, and
    the run ends (without the fix it blocks forever on the first FIFO, or dies on the loop)."""
    src, out = tmp_path / "src", tmp_path / "out"
    _nifti(src / "good.nii.gz", _blob())
    for name in ("pipe.tif", "pipe.mha", "pipe.nii.gz", "pipe.zarr"):
        os.mkfifo(src / name)
    os.symlink(src / "loop_b.nii.gz", src / "loop_a.nii.gz")
    os.symlink(src / "loop_a.nii.gz", src / "loop_b.nii.gz")
    ds = src / "Dataset001_Odd"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                 "file_ending": ".nii.gz"}))
    _nifti(ds / "imagesTr" / "ok_0000.nii.gz", _blob(seed=1))
    _nifti(ds / "labelsTr" / "ok.nii.gz", np.zeros((12, 11, 10), np.uint8))
    os.mkfifo(ds / "imagesTr" / "fifo_0000.nii.gz")
    _nifti(ds / "imagesTr" / "looplabel_0000.nii.gz", _blob(seed=2))
    os.symlink(ds / "labelsTr" / "l2.nii.gz", ds / "labelsTr" / "looplabel.nii.gz")
    os.symlink(ds / "labelsTr" / "looplabel.nii.gz", ds / "labelsTr" / "l2.nii.gz")

    run = _python(f"""
        import sys
        from volssl.cli import main
        sys.exit(main(["preprocess", {str(src)!r}, {str(out)!r}, "--plan", "xnt", "--workers", "1",
                       "--no-progress"]))
    """, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    report = _report(out)
    rules = _rules(report)
    pipes = [k for k in rules if k.startswith("pipe")]  # "pipe" and "pipe-<hash>": the same stem four times
    assert len(pipes) == 4 and len(rules) == 8, rules
    for case_id in pipes + ["loop_a", "loop_b", "Dataset001_Odd_fifo", "Dataset001_Odd_looplabel"]:
        assert rules[case_id] == ["not_regular"], rules
    reasons = " ".join(e["reason"] for e in report["excluded"])
    assert "named pipe (FIFO)" in reasons and "symbolic link loop" in reasons
    ok = {k for k, r in read_manifest(out).items() if r.ok}
    assert ok == {"good", "Dataset001_Odd_ok"}


@pytest.mark.timeout(300)
def test_a_dataset_json_that_is_a_named_pipe_is_refused_not_opened(tmp_path):
    """Acceptance corpus: a named pipe called dataset.json made the dataset a plain folder (its labels and
    naming silently dropped; read_dataset_json would block on it). Now one error naming it: the dataset given
    itself, or nested in a folder; and from read_dataset_json."""
    ds = tmp_path / "src" / "Dataset003_Piped"
    _nifti(ds / "imagesTr" / "a_0000.nii.gz", _blob())
    _nifti(ds / "labelsTr" / "a.nii.gz", np.zeros((12, 11, 10), np.uint8))
    os.mkfifo(ds / "dataset.json")
    result = _rule_in_child(f"""
from volssl.data.readers import discover, read_dataset_json
result = []
for call in (lambda: discover({str(ds)!r}), lambda: discover({str(tmp_path / "src")!r}),
             lambda: read_dataset_json({str(ds)!r})):
    try:
        call()
        result.append("read")
    except ValueError as e:
        result.append(str(e))
""")
    for msg in result:
        assert "dataset.json is a named pipe (FIFO), not a regular file; not opened" in msg, result
        assert str(ds / "dataset.json") in msg


def test_a_volume_with_an_axis_of_length_zero_is_excluded_in_words(tmp_path, capsys):
    """Acceptance corpus: the reason was "ValueError: zero-size array to reduction operation minimum which has
    no identity at _methods.py:45" (the quality check's internal text)."""
    src, out = tmp_path / "src", tmp_path / "out"
    _nifti(src / "empty.nii.gz", np.zeros((12, 11, 0), np.float32))
    _nifti(src / "fine.nii.gz", _blob())
    with pytest.raises(VolumeError) as e:
        read_volume(src / "empty.nii.gz")
    assert e.value.rule == "not_3d" and "(12, 11, 0) has an axis of length 0" in e.value.reason
    s = preprocess(src, out, PLAN, progress=False)
    assert s.n_ok == 1 and _rules(_report(out)) == {"empty": ["not_3d"]}
    assert "Error" not in _report(out)["excluded"][0]["reason"]


def _rule_in_child(code: str, timeout: float = 120) -> list:
    """Run ``code`` (which sets ``result``) in a child; a blocked ``open`` there fails the test."""
    run = _python(code + "\nimport json\nprint(json.dumps(result))", timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_check_case_refuses_a_pipe_before_the_size_rule(tmp_path):
    """Not "file is 0.0 kB" (the size of a FIFO): the reason names what the entry is; read_volume too."""
    os.mkfifo(tmp_path / "x.nii.gz")
    result = _rule_in_child(f"""
from volssl.data.quality import QualityRules, check_case
from volssl.data.readers import SourceCase, VolumeError, read_volume
case = SourceCase(id="x", images=({str(tmp_path / "x.nii.gz")!r},), channels=("image",))
result = [[p.rule, p.reason] for p in check_case(case, QualityRules()).problems]
try:
    read_volume({str(tmp_path / "x.nii.gz")!r})
except VolumeError as e:
    result.append([e.rule, e.reason])
""")
    assert [r[0] for r in result] == ["not_regular", "not_regular"]
    assert all("named pipe (FIFO)" in r[1] for r in result)


# ---------------------------------------------------------------------------------------------- 2. size guard


def _nifti_header(shape, dtype=np.uint8) -> bytes:
    """A single-file NIfTI-1 header (352 bytes, voxel data follow) declaring ``shape`` and ``dtype``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def _zeros_gzip_member(nbytes: int) -> bytes:
    """One gzip member of ``nbytes`` zero bytes (~1 kB per MB of zeros)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 24)
    parts = [comp.compress(chunk) for _ in range(nbytes // len(chunk))]
    parts.append(comp.compress(bytes(nbytes % len(chunk))))
    parts.append(comp.flush())
    return b"".join(parts)


_PEAK = """
    import json, resource, sys
    from volssl.data.readers import VolumeError, read_volume
    results = {}
    for name, limit in CALLS:
        try:
            read_volume(name, max_voxels=limit)
            results[name + str(limit)] = "read"
        except VolumeError as e:
            results[name + str(limit)] = [e.rule, e.reason]
    # VmHWM: this process's own peak (ru_maxrss also counts the forking parent's pages before the exec,
    # so inside a large pytest process it would report the parent's size)
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
    peak = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"results": results, "peak_mb": peak / 1024}))
"""


def _read_in_child(calls: list[tuple[str, int | None]], timeout: float = 240) -> dict:
    run = _python(f"CALLS = {calls!r}\n" + textwrap.dedent(_PEAK), timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_oversized_headers_are_refused_before_any_data_is_read(tmp_path):
    """A 300 kB file whose header declares 640^3 float32 (1 GB): refused by the voxel limit, and without a
    limit as truncated, in both cases without allocating the declared gigabyte."""
    rng = np.random.default_rng(0)
    body = rng.integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    plain = tmp_path / "liar.nii"
    plain.write_bytes(_nifti_header((640, 640, 640), np.float32) + body)
    packed = tmp_path / "liar.nii.gz"
    packed.write_bytes(gzip.compress(_nifti_header((640, 640, 640), np.float32) + body, 1))
    got = _read_in_child([(str(plain), 256 ** 3), (str(plain), None), (str(packed), 256 ** 3), (str(packed), None)])
    res = got["results"]
    for name in (plain, packed):
        rule, reason = res[f"{name}{256 ** 3}"]
        assert rule == "too_large" and "(640, 640, 640)" in reason and "16,777,216" in reason, reason
        rule, reason = res[f"{name}None"]
        assert rule == "unreadable" and "truncated" in reason, reason
    assert got["peak_mb"] < 600, got  # the declared array is 1000 MB


@pytest.mark.timeout(400)
def test_gzip_bomb_is_refused_with_bounded_memory(tmp_path):
    """~1 MB of gzip that expands to 1 GiB: with an honest 1024^3 header it is refused by the voxel limit;
    with a header that declares 64^3 the stream is longer than declared and is refused after reading
    one byte past the declared size. Peak memory stays far below the gigabyte (before: > 1 GiB)."""
    zeros = _zeros_gzip_member(1024 ** 3)
    honest = tmp_path / "bomb.nii.gz"
    honest.write_bytes(gzip.compress(_nifti_header((1024, 1024, 1024))) + zeros)
    liar = tmp_path / "small_header.nii.gz"
    liar.write_bytes(gzip.compress(_nifti_header((64, 64, 64))) + zeros)
    assert honest.stat().st_size < 1_500_000
    got = _read_in_child([(str(honest), 512 ** 3), (str(liar), None)])
    rule, reason = got["results"][f"{honest}{512 ** 3}"]
    assert rule == "too_large" and "(1024, 1024, 1024)" in reason
    rule, reason = got["results"][f"{liar}None"]
    assert rule == "unreadable" and "more data than the header declares" in reason
    assert got["peak_mb"] < 600, got


def test_gzip_nifti_reads_exactly_like_nibabel(tmp_path):
    """The bounded gzip reader gives nibabel's array: scaling, byte order, singleton 4th axis."""
    data = np.random.default_rng(1).integers(0, 1000, size=(7, 6, 5)).astype(">i2")
    img = nib.Nifti1Image(data, np.diag([0.5, 0.7, 2.0, 1.0]))
    img.header.set_slope_inter(0.25, -3.0)
    nib.save(img, tmp_path / "s.nii.gz")
    a, aff = read_volume(tmp_path / "s.nii.gz")
    ref = nib.load(tmp_path / "s.nii.gz")
    assert a.dtype == np.asanyarray(ref.dataobj).dtype and np.array_equal(a, np.asanyarray(ref.dataobj))
    assert np.allclose(aff, ref.affine)
    nib.save(nib.Nifti1Image(data[..., None], np.eye(4)), tmp_path / "s4.nii.gz")
    b, _ = read_volume(tmp_path / "s4.nii.gz")
    assert np.array_equal(b, data)


def test_max_voxels_option_and_default(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _nifti(src / "big.nii.gz", _blob((30, 30, 30)))
    _nifti(src / "small.nii.gz", _blob((10, 10, 10)))
    assert main(["preprocess", str(src), str(out), "--plan", "xnt", "--max-voxels", "20^3", "--workers", "1",
                 "--no-progress"]) == 0
    assert _rules(_report(out)) == {"big": ["too_large"]}
    assert "exceeds the limit of 8,000 voxels" in capsys.readouterr().out
    # a rerun with a larger limit picks the excluded case up again (the limit is a run option)
    s = preprocess(src, out, "xnt", progress=False, max_voxels=30 ** 3)
    assert s.n_ok == 2 and s.n_processed == 1 and s.max_voxels == 27_000
    assert main(["preprocess", str(src), str(tmp_path / "o2"), "--max-voxels", "lots", "--no-progress"]) == 2
    assert "--max-voxels" in capsys.readouterr().err
    assert default_max_voxels() >= 64 ** 3


def test_output_folder_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "src"
    _nifti(src / "a.nii.gz", _blob())
    (tmp_path / "out").write_text("not a folder")
    assert main(["preprocess", str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "out" in err and "is an existing file" in err


# ---------------------------------------------------------------------------------------------- 3. values


def test_values_beyond_float32_complex_and_rgb_are_excluded_in_words(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    huge = _blob().astype(np.float64)
    huge[3, 3, 3] = 1e39
    _nifti(src / "huge.nii", huge)
    _nifti(src / "cplx_nii.nii", (_blob() + 1j * _blob(seed=3)).astype(np.complex64))
    rgb = np.zeros((12, 11, 10), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = 7
    _nifti(src / "rgb.nii", rgb)
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray((_blob() + 1j).astype(np.complex64)), str(src / "cplx_mha.mha"))
    _nifti(src / "fine.nii", _blob().astype(np.float64))
    assert main(["preprocess", str(src), str(out), "--plan", "xnt", "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = _report(out)
    by = {e["id"]: e for e in report["excluded"]}
    assert _rules(report) == {"huge": ["out_of_range"], "cplx_nii": ["bad_dtype"], "cplx_mha": ["not_3d"],
                              "rgb": ["bad_dtype"]}
    assert "values beyond float32 range (max |value| 1e+39" in by["huge"]["reason"]
    assert "complex numbers (complex64)" in by["cplx_nii"]["reason"]
    assert "complex-valued" in by["cplx_mha"]["reason"]  # ITK's header tells 2 components, not which kind
    assert by["rgb"]["problems"][0]["rule"] == "bad_dtype" and "colour (RGB)" in by["rgb"]["reason"]
    for text in (printed, json.dumps(report)):
        assert "ufunc" not in text and "invalid literal" not in text and "Traceback" not in text
    assert read_manifest(out)["fine"].ok


# ---------------------------------------------------------------------------------------------- 4. Zarr chunks


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_with_missing_chunks_is_an_error_unless_allowed(tmp_path, zarr_format):
    import zarr

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    zyx = np.random.default_rng(4).normal(size=(8, 8, 8)).astype(np.float32) + 10
    z = zarr.open_array(src / "vol.zarr", mode="w", shape=zyx.shape, chunks=(4, 4, 4), dtype="f4",
                        zarr_format=zarr_format)
    z[:] = zyx
    chunk = (src / "vol.zarr" / "1.0.1") if zarr_format == 2 else (src / "vol.zarr" / "c" / "1" / "0" / "1")
    assert chunk.is_file()
    chunk.unlink()
    with pytest.raises(VolumeError) as e:
        read_volume(src / "vol.zarr", spacing=(1, 1, 1), allow_missing_chunks=False)
    assert e.value.rule == "missing_chunks" and "1 of 8 chunk files" in e.value.reason
    s = preprocess(src, out, PLAN, spacing=(1.0, 1.0, 1.0), progress=False)
    assert s.n_ok == 0 and _rules(_report(out)) == {"vol": ["missing_chunks"]}
    assert "--zarr-allow-missing-chunks" in _report(out)["excluded"][0]["reason"]
    # the flag (a run option): the excluded case is redone, stored, and the report warns
    s = preprocess(src, out, PLAN, spacing=(1.0, 1.0, 1.0), progress=False, allow_missing_chunks=True)
    assert s.n_ok == 1 and s.n_processed == 1
    warnings = _report(out)["warnings"]
    assert [(w["id"], w["rule"]) for w in warnings] == [("vol", "missing_chunks")]
    assert "1 of 8 chunk files" in warnings[0]["reason"]


def test_zarr_store_with_a_pipe_is_not_opened(tmp_path):
    import zarr

    z = zarr.open_array(tmp_path / "v.zarr", mode="w", shape=(4, 4, 4), chunks=(2, 2, 2), dtype="f4",
                        zarr_format=2)
    z[:] = 1
    (tmp_path / "v.zarr" / "0.0.0").unlink()
    os.mkfifo(tmp_path / "v.zarr" / "0.0.0")
    rule, reason = _rule_in_child(f"""
from volssl.data.readers import VolumeError, read_volume
try:
    read_volume({str(tmp_path / "v.zarr")!r}, spacing=(1, 1, 1))
    result = ["read", ""]
except VolumeError as e:
    result = [e.rule, e.reason]
""")
    assert rule == "not_regular" and "0.0.0" in reason and "named pipe" in reason


# ---------------------------------------------------------------------------------------------- 5. geometry


def _patched_nifti(path: Path, pixdim, qform_code: int, sform_code: int) -> Path:
    """A NIfTI whose raw header says ``pixdim[1:4]`` and the two form codes (nibabel's writer fixes them)."""
    _nifti(path, _blob())
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)
    raw[252:256] = struct.pack("<2h", qform_code, sform_code)
    path.write_bytes(bytes(raw))
    return path


def test_zero_or_negative_voxel_sizes(tmp_path, capsys):
    import SimpleITK as sitk
    import tifffile

    src, out = tmp_path / "src", tmp_path / "out"
    _patched_nifti(src / "nogeo.nii", (0, 0, 0), 0, 0)
    _patched_nifti(src / "zero_q.nii", (0, 0, 0), 1, 0)
    _patched_nifti(src / "neg.nii", (-1, 1, 1), 1, 0)
    _patched_nifti(src / "part.nii", (1, 0, 1), 0, 0)
    sitk.WriteImage(sitk.GetImageFromArray(_blob()), str(src / "t.mha"))
    text = (src / "t.mha").read_bytes()
    for name, spacing in (("zero.mha", b"0 0 0"), ("negative.mha", b"-1 1 1")):
        (src / name).write_bytes(text.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = " + spacing))
    (src / "t.mha").unlink()
    tifffile.imwrite(src / "ij.tif", _blob().astype(np.uint16), imagej=True, resolution=(0.0, 2.0),
                     metadata={"spacing": 0.0, "unit": "um", "axes": "ZYX"})
    assert main(["preprocess", str(src), str(out), "--plan", "xnt", "--workers", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = _report(out)
    assert _rules(report) == {k: ["bad_spacing"] for k in ("zero_q", "neg", "part", "zero", "negative", "ij")}
    for e in report["excluded"]:
        assert "zero, negative or not a number" in e["reason"] and "Error" not in e["reason"], e["reason"]
    # no geometry at all (nnU-Net/SimpleITK: 1 mm): used, with a warning in report.json and the log
    rec = read_manifest(out)["nogeo"]
    assert rec.ok and np.allclose(rec.spacing, 1.0)
    (w,) = report["warnings"]
    assert (w["id"], w["rule"]) == ("nogeo", "assumed_spacing") and "1 mm" in w["reason"]
    logged = printed.split("warnings (1):")[1]
    assert "nogeo: " in logged and "read with 1 mm isotropic voxels" in logged
    # the warning survives a resumed run (it is kept with the manifest row)
    s = preprocess(src, out, PreprocessPlan.from_dict(json.loads((out / "plan.json").read_text())), progress=False)
    assert s.n_processed == 0 and [w["rule"] for w in s.warnings] == ["assumed_spacing"]


# ---------------------------------------------------------------------------------------------- 6. dataset.json, labels


@pytest.mark.parametrize("meta, field", [
    ([], "must be a JSON object"),
    (None, "must be a JSON object"),
    ({"channel_names": {"0": "CT"}, "file_ending": None}, "'file_ending'"),
    ({"channel_names": {"0": "CT"}, "file_ending": 5}, "'file_ending'"),
    ({"channel_names": ["CT"]}, "'channel_names'"),
    ({"channel_names": {"zero": "CT"}}, "'channel_names'"),
    ({"channel_names": {"0": 1}}, "'channel_names.0'"),
    ({"channel_names": {"0": "CT"}, "labels": ["background"]}, "'labels'"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1.5}}, "'labels.tumour'"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": "one"}}, "'labels.tumour'"),
    ({"channel_names": {"0": "CT"}, "numTraining": "3"}, "'numTraining'"),
    ({"labels": {"background": 0}}, "no 'channel_names'"),
])
def test_malformed_dataset_json_is_one_readable_error(tmp_path, meta, field):
    ds = tmp_path / "Dataset001_Bad"
    (ds / "imagesTr").mkdir(parents=True)
    _nifti(ds / "imagesTr" / "a_0000.nii.gz", _blob())
    (ds / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError) as e:
        discover(ds)
    msg = str(e.value)
    assert "dataset.json" in msg and field in msg, msg
    assert "invalid literal" not in msg and "object has no attribute" not in msg
    with pytest.raises(ValueError, match="dataset.json"):
        read_dataset_json(ds)


def test_nnunet_naming_labels_and_channel_count(tmp_path):
    """Undeclared channel -> excluded; label without images -> warning; training image without label ->
    used with a warning (pre-training); non-integer label map -> excluded (never rounded)."""
    ds = tmp_path / "Dataset002_Mixed"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (ds / d).mkdir(parents=True)
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz",
        "numTraining": 4}))
    lab = np.zeros((12, 11, 10), np.float32)
    lab[2:5, 2:5, 2:5] = 1
    for case in ("good", "extra", "nolabel", "half"):
        _nifti(ds / "imagesTr" / f"{case}_0000.nii.gz", _blob(seed=len(case)))
    _nifti(ds / "imagesTr" / "extra_0001.nii.gz", _blob(seed=9))
    for case in ("good", "extra"):
        _nifti(ds / "labelsTr" / f"{case}.nii.gz", lab.astype(np.uint8))
    half = lab.copy()
    half[3, 3, 3] = 1.5
    _nifti(ds / "labelsTr" / "half.nii.gz", half)
    _nifti(ds / "labelsTr" / "orphan.nii.gz", lab.astype(np.uint8))
    _nifti(ds / "imagesTr" / "misnamed.nii.gz", _blob())
    _nifti(ds / "imagesTs" / "t_0000.nii.gz", _blob(seed=5))

    out = tmp_path / "out"
    s = preprocess(ds, out, PLAN, progress=False)
    report = _report(out)
    assert _rules(report) == {"extra": ["channel_count"], "half": ["label_nonint"]}
    by = {e["id"]: e for e in report["excluded"]}
    assert "extra_0001.nii.gz" in by["extra"]["reason"] and "not declared" in by["extra"]["reason"]
    assert "non-integer values (e.g. 1.5)" in by["half"]["reason"] and "not rounded" in by["half"]["reason"]
    recs = read_manifest(out)
    assert recs["good"].ok and recs["good"].has_label
    assert recs["nolabel"].ok and not recs["nolabel"].has_label and recs["t"].ok
    warned = {(w["id"], w["rule"]) for w in report["warnings"]}
    assert warned == {(None, "orphan_label"), (None, "ignored_file"), ("nolabel", "no_label")}
    assert {w["rule"] for w in s.warnings} == {"orphan_label", "ignored_file", "no_label"}
    orphan = next(w for w in report["warnings"] if w["rule"] == "orphan_label")
    assert orphan["path"].endswith("labelsTr/orphan.nii.gz")


# ---------------------------------------------------------------------------------------------- 7. process hygiene

_SLOW_WORK = '''
import os, time
from pathlib import Path

def work(case, checksum):
    """Stands in for process_case: announces its pid, then takes "forever"."""
    (Path(os.environ["PIDS"]) / str(os.getpid())).write_text(case.id)
    time.sleep(300)
'''


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.timeout(300)
def test_workers_exit_when_the_main_process_is_killed(tmp_path):
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "slowwork.py").write_text(_SLOW_WORK)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    script = textwrap.dedent(f"""
        from pathlib import Path
        import slowwork
        from volssl.data.preprocess import _map_cases
        from volssl.data.readers import SourceCase
        cases = [SourceCase(id=f"c{{i}}", images=(f"/none/{{i}}.nii",), channels=("image",)) for i in range(4)]
        for rec in _map_cases(cases, slowwork.work, 2, Path({str(tmp_path)!r}), {{c.id: "x" for c in cases}}):
            pass
    """)
    env = dict(os.environ, PIDS=str(pids_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "mods"), str(SRC_ROOT), os.environ.get("PYTHONPATH", "")]))
    main_proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while len(workers) < 2:
            assert time.monotonic() < deadline and main_proc.poll() is None, "the workers never started"
            time.sleep(0.2)
            workers = [int(p.name) for p in pids_dir.iterdir()]
        os.kill(main_proc.pid, signal.SIGKILL)
        main_proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in workers), f"workers {workers} outlived the killed main process"
    finally:
        if main_proc.poll() is None:
            main_proc.kill()
            main_proc.wait()
        for pid in workers:  # a regression must not leave them running
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("text", ["[]", "null", '{"channel_names": {"0": "T1"}, "labels": {"background": 0}, '
                                                '"file_ending": null}'])
def test_the_fingerprint_names_a_malformed_dataset_json_in_words(tmp_path, text):
    from volssl.data.fingerprint import naming_problems

    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(text)
    problems = naming_problems(tmp_path)
    assert len(problems) == 1 and "dataset.json" in problems[0] and "Traceback" not in problems[0]
    assert "object has no attribute" not in problems[0]
