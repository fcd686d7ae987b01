#!/usr/bin/env python
"""Acceptance corpus of docs/robustness.md: new hostile files for every class of bad input or fault,
run through the real ``volssl`` commands in subprocesses (with timeouts), and a table of what went wrong.

    python scripts/robustness_corpus.py --out DIR [--quick]

Classes (the sections of docs/robustness.md):

1. outputs: an output that is an existing file, or a path under one (preprocess, predict, evaluate,
   finetune, pretrain); symbolic link loops as inputs and inside input folders; dataset.json that is
   ``[]``, ``null``, has ``"file_ending": null`` or ``channel_names`` as a list
2. pipes: named pipes called ``*.tif``, ``*.mha``, ``*.nii.gz``, ``*.nrrd`` next to good files (preprocess
   with ``--plan xnt`` and with the default plan, 1 and 2 workers, plain folder and nnU-Net layout; predict;
   evaluate); a named pipe as dataset.json and as the ``--model`` / ``--checkpoint`` file
3. values: float64 beyond float32's range (values and header scaling), NaN/inf voxels, a Zarr store
   with a chunk file deleted or damaged (v2 and v3), with and without ``--zarr-allow-missing-chunks``
4. resume: ``pretrain --resume`` with latest.pt missing, a dangling link, a folder, bit-flipped, a named
   pipe; with final.pt (continued to 8 steps) and without (falls back to best.pt); and with no intact
   checkpoint at all (refused, nothing changed)
5. memory: a ~1 MB gzip NIfTI that expands to 1024^3 (honest header, and a header declaring 64^3) and a
   300 kB file whose header declares 640^3 (plain and gzip), read by preprocess, predict and evaluate
6. silent: complex images, zero / negative pixdim, all-zero geometry (qform/sform codes 0), an axis of
   length 0, a NaN affine, label 1.5, channel-count mismatches (one too few, one too many), an orphan
   label, a training image without label, evaluate with 255 / -1 reference labels and a 1.5 prediction:
   each must be an exclusion with a reason in words or a warning, not silence
7. kill: ``kill -9`` of the main preprocess process; every process it started must be gone within 10 s

For each case the script records: a Python traceback in the output without ``--debug``, a hang (the
timeout), a corrupted volume stored as ok (NaN/inf, constant output for a volume with data, or a volume
that should have been refused), lost history (scalars.csv rows or best.pt lost after a resume), a
silent acceptance (no exclusion reason, no warning), whether every good file next to the hostile ones
was processed, and the peak memory (VmHWM) of the volssl process tree (``getrusage(RUSAGE_CHILDREN)``
of a small wrapper process). The default plan runs with ``--min-file-kb off --min-fov off`` so that the
small good files pass its clinical filter. Every failure is listed under the table, and every case (with
its peak memory) is written to DIR/results.json. The exit status is 0 when nothing failed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np

CLASSES = {
    1: "outputs, link loops, dataset.json",
    2: "named pipes",
    3: "values, Zarr chunks",
    4: "pretrain --resume",
    5: "gzip bomb, header liar",
    6: "silent acceptance",
    7: "kill -9 of preprocess",
}
#: a process tree above this peak (MB) for a hostile file counts as unbounded memory (the files declare ~1 GiB)
PEAK_LIMIT_MB = 800.0
#: a reason that is an exception's text rather than words (volssl's describe_error: "ValueError: ... at x.py:45")
INTERNAL_TEXT = re.compile(r"\b\w+(Error|Exception): .* at [\w.]+\.py:\d+|ufunc '|invalid literal for")
#: volssl's rules that make tiny good files acceptable to the default (s3d) plan
RULES_OFF = ["--min-file-kb", "off", "--min-fov", "off"]

# The wrapper runs one command and reports the peak resident memory of its process tree: ru_maxrss of
# RUSAGE_CHILDREN is the largest VmHWM of any waited-for descendant (pool workers included).
_PEAK_WRAPPER = textwrap.dedent("""
    import resource, subprocess, sys
    rc = subprocess.call(sys.argv[2:])
    with open(sys.argv[1], "w") as fh:
        fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    sys.exit(rc)
""")


# ---------------------------------------------------------------------------------------------- bookkeeping


@dataclass
class Run:
    """One finished (or killed) CLI call."""

    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    peak_mb: float | None

    @property
    def text(self) -> str:
        return self.stdout + self.stderr

    @property
    def last_error_line(self) -> str:
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else ""


@dataclass
class Case:
    cls: int
    name: str
    failures: list[str] = field(default_factory=list)
    traceback: bool = False
    hang: bool = False
    corrupt: bool = False
    lost: bool = False
    silent: bool = False
    good: list[int] = field(default_factory=lambda: [0, 0])  # [processed, expected]
    peak_mb: float | None = None

    def fail(self, what: str, kind: str | None = None) -> None:
        """Record a failure; ``kind`` also counts it in a column (corrupt, lost, silent)."""
        self.failures.append(what)
        if kind:
            setattr(self, kind, True)


class Corpus:
    """The output folder, the CLI runner and the cases recorded so far."""

    def __init__(self, out: Path, quick: bool, timeout: float) -> None:
        self.out = out
        self.quick = quick
        self.timeout = timeout
        self.cases: list[Case] = []
        self.volssl = [sys.executable, "-m", "volssl"]
        self.env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.env.pop("VOLSSL_DEBUG", None)

    def dir(self, *parts: str) -> Path:
        path = self.out.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def case(self, cls: int, name: str) -> Case:
        c = Case(cls, name)
        self.cases.append(c)
        return c

    def cli(self, case: Case | None, *args: str, timeout: float | None = None) -> Run:
        """Run ``volssl ARGS`` (no --debug) under the peak-memory wrapper; a timeout kills its process group.
        Tracebacks, hangs and exit code 1 (a bug) are recorded on ``case``."""
        peak_file = self.out / ".peak"
        peak_file.unlink(missing_ok=True)
        argv = [sys.executable, "-c", _PEAK_WRAPPER, str(peak_file), *self.volssl, *map(str, args)]
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env,
                                cwd=self.out, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout or self.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            timed_out = True
        peak = float(peak_file.read_text()) / 1024 if peak_file.is_file() else None
        run = Run([str(a) for a in args], None if timed_out else proc.returncode, stdout, stderr,
                  time.monotonic() - t0, timed_out, peak)
        if case is not None:
            shown = " ".join(run.argv[:2])
            if run.peak_mb is not None:
                case.peak_mb = max(case.peak_mb or 0.0, run.peak_mb)
            if timed_out:
                case.hang = True
                case.fail(f"`volssl {shown}` hung (killed after {timeout or self.timeout:.0f} s)")
            elif "Traceback" in run.text:
                case.traceback = True
                tail = run.stderr[run.stderr.rfind("Traceback"):].strip().splitlines()
                case.fail(f"`volssl {shown}` printed a traceback: {tail[-1] if tail else ''}")
            elif run.rc == 1:
                case.fail(f"`volssl {shown}` exit 1 (a bug): {run.last_error_line}")
        return run


# ---------------------------------------------------------------------------------------------- file makers


def blob(shape=(32, 32, 32), seed: int = 0, dtype=np.float32) -> np.ndarray:
    """A volume with data everywhere (mean 100, sd 20)."""
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(dtype)


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def patched_nifti(path: Path, data: np.ndarray, pixdim, qform_code: int, sform_code: int) -> Path:
    """An uncompressed NIfTI whose raw header carries ``pixdim[1:4]`` and the two form codes (nibabel's
    writer would repair them)."""
    nifti(path, data)
    raw = bytearray(path.read_bytes())
    raw[80:92] = struct.pack("<3f", *pixdim)
    raw[252:256] = struct.pack("<2h", qform_code, sform_code)
    if qform_code == 0 and sform_code == 0:
        raw[256:280] = bytes(24)  # quatern b, c, d and the qoffsets
        raw[280:328] = bytes(48)  # srow_x, srow_y, srow_z
    path.write_bytes(bytes(raw))
    return path


def fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def link_loop(a: Path, b: Path) -> Path:
    """``a -> b -> a``."""
    a.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def nifti_header(shape, dtype=np.uint8) -> bytes:
    """A single-file NIfTI-1 header (352 bytes) declaring ``shape``; voxel data follow."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    hdr["vox_offset"] = 352
    return hdr.binaryblock + b"\0" * 4


def gzip_bomb(path: Path, header_shape, n_bytes: int = 1024 ** 3) -> Path:
    """A gzip NIfTI of ~1 MB: the header (one gzip member) then ``n_bytes`` zeros (members of 16 MiB of
    zeros, repeated: a multi-member gzip stream decompresses to their concatenation)."""
    chunk = 16 << 20
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = comp.compress(bytes(chunk)) + comp.flush()
    with open(path, "wb") as fh:
        fh.write(gzip.compress(nifti_header(header_shape)))
        for _ in range(n_bytes // chunk):
            fh.write(member)
    return path


def header_liar(path: Path, shape=(640, 640, 640)) -> Path:
    """A 300 kB NIfTI whose header declares ``shape`` float32 (1 GB at 640^3)."""
    body = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    data = nifti_header(shape, np.float32) + body
    path.write_bytes(gzip.compress(data, 1) if path.name.endswith(".gz") else data)
    return path


def flip_tensor_bit(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor stored in a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"<{path} missing>"


# ---------------------------------------------------------------------------------------------- result readers


def preprocess_result(out: Path) -> tuple[dict[str, Any], dict[str, dict], list[dict]]:
    """(manifest rows by id, excluded entries of report.json by id, warnings of report.json)."""
    from volssl.data.manifest import read_manifest

    report = json.loads((out / "report.json").read_text()) if (out / "report.json").is_file() else {}
    excluded = {e["id"]: e for e in report.get("excluded", [])}
    return read_manifest(out), excluded, report.get("warnings", [])


def stored_problem(out: Path, case_id: str) -> str | None:
    """What is wrong with a stored preprocessed image: non-finite values, or constant (all zeros)."""
    from volssl.data.storage import load_array

    path = out / "images" / f"{case_id}.b2nd"
    if not path.is_file():
        return f"{path} missing"
    a = load_array(path, nthreads=1)
    if not np.isfinite(a).all():
        return f"{path}: {int((~np.isfinite(a)).sum())} NaN/inf voxels"
    if a.size and float(a.max()) == float(a.min()):
        return f"{path}: constant {float(a.max())} (the source had data)"
    return None


def check_preprocess(case: Case, run: Run, out: Path, expect: dict[str, str], ok_rc=(0,)) -> None:
    """Judge a preprocess run against ``expect``: case id -> "ok" (a good file), "warn" (ok with a warning
    naming it), "excluded" (refused with a reason). Every stored image is also checked for NaN/inf."""
    if run.timed_out or run.rc not in ok_rc:
        if not run.timed_out and "Traceback" not in run.text:
            case.fail(f"preprocess exit {run.rc}, expected {ok_rc}: {run.last_error_line}")
        case.good[1] += sum(v == "ok" for v in expect.values())
        return
    rows, excluded, warnings = preprocess_result(out)
    warned = {w.get("id") for w in warnings}
    for cid, e in excluded.items():
        if INTERNAL_TEXT.search(e.get("reason") or ""):
            case.fail(f"{cid}: the reason is internal text, not words: {e['reason'][:160]}")
    for cid, want in expect.items():
        row = rows.get(cid)
        if want == "ok":
            case.good[1] += 1
            if row is not None and row.ok:
                case.good[0] += 1
            else:
                case.fail(f"good file {cid} not processed: {row.reason if row else 'not in the manifest'}")
        elif want == "warn":
            if row is None or not row.ok:
                case.fail(f"{cid}: expected processed with a warning, got {row.reason if row else 'nothing'}")
            elif cid not in warned:
                case.fail(f"{cid}: processed without a warning", "silent")
        elif want == "excluded":
            if row is not None and row.ok:
                problem = stored_problem(out, cid)
                if problem:
                    case.fail(f"{cid}: stored as ok: {problem}", "corrupt")
                else:
                    case.fail(f"{cid}: accepted, expected an exclusion", "silent")
            elif cid not in excluded or not excluded[cid].get("reason"):
                case.fail(f"{cid}: not processed and not in report.json's exclusions", "silent")
    for cid, row in rows.items():
        if row.ok and expect.get(cid) != "excluded":
            problem = stored_problem(out, cid)
            if problem:
                case.fail(f"{cid}: stored as ok: {problem}", "corrupt")


def expect_refusal(case: Case, run: Run, *words: str, unchanged: Path | None = None,
                   before: str | None = None) -> None:
    """A user error: exit 2, one ``volssl CMD: error: ...`` line naming ``words``, ``unchanged`` intact."""
    if run.timed_out or "Traceback" in run.text:
        return
    line = run.last_error_line
    if run.rc == 0:
        case.fail(f"`volssl {run.argv[0]}` accepted it (exit 0), expected a refusal (exit 2)", "silent")
    elif run.rc != 2:
        case.fail(f"`volssl {run.argv[0]}` exit {run.rc}, expected 2 (refused): {line}")
    elif ": error: " not in line or not all(w in line for w in words):
        case.fail(f"`volssl {run.argv[0]}` message does not name {words}: {line}")
    if unchanged is not None and before is not None and sha(unchanged) != before:
        case.fail(f"{unchanged} was changed by a refused command", "lost")


# ---------------------------------------------------------------------------------------------- shared fixtures


class Fixtures:
    """A small brain-phantom dataset (3 channels, 32^3), its preprocessed copy, a 6-step pre-training run
    and a 4-step fine-tuned model: what the hostile commands need besides their hostile file."""

    def __init__(self, corpus: Corpus) -> None:
        self.c = corpus
        base = corpus.dir("fixtures")
        self.raw = base / "phantoms"
        self.pre = base / "preprocessed"
        self.run = base / "pretrain"
        self.ft = base / "finetune"
        self.steps = 6
        self.pretrain_args = ["--data", self.pre, "--no-progress", "--set", f"train.steps={self.steps}",
                              "--set", "train.checkpoint_every=2", "--set", "train.log_every=1",
                              "--set", "data.patch_size=32,32,32", "--set", "data.num_workers=0",
                              "--set", "train.device=cpu"]
        setup = corpus.case(0, "fixtures")
        steps = [
            ("phantoms", "--out", self.raw, "--kind", "brain", "--n", "5", "--n-test", "1", "--shape", "32,32,32",
             "--no-progress"),
            ("preprocess", self.raw, self.pre, "--workers", "1", "--no-progress", *RULES_OFF),
            ("pretrain", "--preset", "s3d-b-tiny", "--out", self.run, *self.pretrain_args),
            ("finetune", "--checkpoint", self.run, "--dataset", self.raw, "--out", self.ft, "--recipe", "s3d-tiny",
             "--stage-steps", "1,1,2", "--no-progress"),
        ]
        for args in steps:
            run = corpus.cli(setup, *args, timeout=300)
            if run.rc != 0:
                shown = " ".join(map(str, args))
                raise SystemExit(f"fixture `volssl {shown}` failed ({run.rc}):\n{run.stderr[-3000:]}")
        self.shape = nib.load(str(self.raw / "imagesTs" / "brain_005_0000.nii.gz")).shape
        self.affine = nib.load(str(self.raw / "imagesTs" / "brain_005_0000.nii.gz")).affine

    def predict_case(self, folder: Path, case_id: str) -> None:
        """Copy the held-out phantom's three channel files into ``folder`` as ``case_id``."""
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            shutil.copy(self.raw / "imagesTs" / f"brain_005_{k:04d}.nii.gz", folder / f"{case_id}_{k:04d}.nii.gz")

    def predict(self, case: Case, folder: Path, out: Path, expect: dict[str, str]) -> Run:
        """``volssl predict`` on ``folder``; ``expect``: case -> "ok" or "failed" (listed with a reason)."""
        run = self.c.cli(case, "predict", "--model", self.ft, "--input", folder, "--output", out, "--no-mirror",
                         "--device", "cpu", "--no-progress")
        if run.timed_out or "Traceback" in run.text:
            case.good[1] += sum(v == "ok" for v in expect.values())
            return run
        report = json.loads((out / "predict.json").read_text()) if (out / "predict.json").is_file() else None
        if report is None:
            case.fail(f"predict exit {run.rc} without predict.json: {run.last_error_line}")
            case.good[1] += sum(v == "ok" for v in expect.values())
            return run
        done = {p["case"] for p in report.get("predicted", [])}
        failed = {f.get("case"): f for f in report.get("failed", [])}
        for cid, want in expect.items():
            if want == "ok":
                case.good[1] += 1
                if cid in done and (out / f"{cid}.nii.gz").is_file():
                    case.good[0] += 1
                else:
                    case.fail(f"predict: good case {cid} not predicted ({failed.get(cid)})")
            elif cid in done:
                case.fail(f"predict: hostile case {cid} was predicted, expected a failure with a reason", "silent")
            elif cid not in failed or not (failed[cid].get("reason") or failed[cid].get("error")):
                case.fail(f"predict: {cid} neither predicted nor listed as failed with a reason", "silent")
        return run


def evaluate(corpus: Corpus, case: Case, pred: Path, ref: Path, out: Path, good: list[str],
             bad: list[str] = (), warned: list[str] = ()) -> dict | None:
    """``volssl evaluate``: ``good`` pairs scored, ``bad`` ones listed as errors with a reason, a warning
    naming each of ``warned``."""
    run = corpus.cli(case, "evaluate", pred, ref, "--out", out / "metrics.json", "--workers", "1", "--no-progress")
    if run.timed_out or "Traceback" in run.text:
        case.good[1] += len(good)
        return None
    if not (out / "metrics.json").is_file():
        case.fail(f"evaluate exit {run.rc} without metrics.json: {run.last_error_line}")
        case.good[1] += len(good)
        return None
    m = json.loads((out / "metrics.json").read_text())
    scored = {c.get("case") or c.get("id") for c in m.get("cases", [])}
    errors = " ".join(json.dumps(e) for e in m.get("errors", []))
    for cid in good:
        case.good[1] += 1
        if cid in scored:
            case.good[0] += 1
        else:
            case.fail(f"evaluate: good pair {cid} not scored")
    for cid in bad:
        if cid in scored or cid not in errors:
            case.fail(f"evaluate: {cid} scored or not listed as an error with its reason", "silent")
    for cid in warned:
        if not any(cid in json.dumps(w) for w in m.get("warnings", [])):
            case.fail(f"evaluate: no warning names {cid}", "silent")
        elif "warning" not in run.text.lower():
            case.fail(f"evaluate: the warning for {cid} is not printed", "silent")
    return m


# ---------------------------------------------------------------------------------------------- 1. outputs, loops


def class_outputs(c: Corpus, fx: Fixtures) -> None:
    base = c.dir("c1")
    a_file = base / "a_file"
    a_file.write_text("precious\n")
    before = sha(a_file)
    under = a_file / "sub"
    a_dir = c.dir("c1", "a_dir")
    loop = link_loop(base / "loop_a", base / "loop_b")
    src = c.dir("c1", "src")
    nifti(src / "good.nii.gz", blob())
    refs = c.dir("c1", "refs")
    nifti(refs / "p.nii.gz", (blob() > 100).astype(np.uint8))
    pretrain_out = ["pretrain", "--preset", "s3d-b-tiny", *fx.pretrain_args]
    finetune = ["finetune", "--checkpoint", fx.run, "--dataset", fx.raw, "--recipe", "s3d-tiny", "--stage-steps",
                "1,1,2", "--no-progress"]
    predict = ["predict", "--model", fx.ft, "--no-mirror", "--device", "cpu", "--no-progress"]
    outputs = {
        "preprocess": lambda o: ["preprocess", src, o, "--no-progress"],
        "predict": lambda o: [*predict, "--input", fx.raw / "imagesTs", "--output", o],
        "finetune": lambda o: [*finetune, "--out", o],
        "pretrain": lambda o: [*pretrain_out, "--out", o],
    }
    for command, argv in outputs.items():
        for label, target in (("an existing file", a_file), ("a path under a file", under)):
            if c.quick and label != "an existing file" and command != "preprocess":
                continue
            case = c.case(1, f"{command}: output is {label}")
            expect_refusal(case, c.cli(case, *argv(target)), str(a_file), unchanged=a_file, before=before)
    for label, target in (("an existing folder", a_dir), ("a path under a file", under / "metrics.json")):
        case = c.case(1, f"evaluate: --out is {label}")
        run = c.cli(case, "evaluate", refs, refs, "--out", target, "--no-progress")
        expect_refusal(case, run, str(a_dir if target == a_dir else a_file), unchanged=a_file, before=before)
    case = c.case(1, "preprocess: output is a link loop")
    expect_refusal(case, c.cli(case, "preprocess", src, loop, "--no-progress"), "symbolic link loop")

    # a link loop as the input argument of every command
    loop_inputs = {
        "preprocess": ["preprocess", loop, base / "o_pre", "--no-progress"],
        "predict --input": [*predict, "--input", loop, "--output", base / "o_pred"],
        "predict --model": ["predict", "--model", loop, "--input", fx.raw / "imagesTs", "--output", base / "o_pm"],
        "evaluate": ["evaluate", loop, refs, "--out", base / "o_ev" / "m.json"],
        "finetune --dataset": ["finetune", "--checkpoint", fx.run, "--dataset", loop, "--out", base / "o_ft"],
        "finetune --checkpoint": ["finetune", "--checkpoint", loop, "--dataset", fx.raw, "--out", base / "o_ft2"],
        "pretrain --data": ["pretrain", "--preset", "s3d-b-tiny", "--data", loop, "--out", base / "o_pt"],
    }
    for label, argv in loop_inputs.items():
        case = c.case(1, f"{label} is a link loop")
        expect_refusal(case, c.cli(case, *argv), "symbolic link loop", str(loop))

    # link loops inside input folders: excluded with a reason, the good files processed
    folder = c.dir("c1", "loops_in")
    nifti(folder / "good.nii.gz", blob(seed=1))
    link_loop(folder / "loopy_a.nii.gz", folder / "loopy_b.nii.gz")
    case = c.case(1, "preprocess: link loops in the folder")
    run = c.cli(case, "preprocess", folder, base / "o_loops", "--plan", "xnt", "--workers", "1", "--no-progress")
    check_preprocess(case, run, base / "o_loops", {"good": "ok", "loopy_a": "excluded", "loopy_b": "excluded"})
    pin = c.dir("c1", "pred_loops")
    fx.predict_case(pin, "good")
    link_loop(pin / "loopy_0000.nii.gz", pin / "loopy_0001.nii.gz")
    case = c.case(1, "predict: a link loop among the inputs")
    fx.predict(case, pin, base / "o_pred_loops", {"good": "ok", "loopy": "failed"})
    pred, ref = c.dir("c1", "ev_loops", "pred"), c.dir("c1", "ev_loops", "ref")
    for d in (pred, ref):
        nifti(d / "good.nii.gz", (blob() > 100).astype(np.uint8))
    nifti(ref / "loopy.nii.gz", (blob() > 100).astype(np.uint8))
    link_loop(pred / "loopy.nii.gz", pred / "loopy_x.nii.gz")
    case = c.case(1, "evaluate: a link loop among the predictions")
    evaluate(c, case, pred, ref, base / "o_ev_loops", good=["good"], bad=["loopy"])

    # malformed dataset.json: one line naming dataset.json (preprocess, finetune, evaluate), no traceback
    variants = {"[]": [], "null": None, "file_ending null": {"channel_names": {"0": "T1"}, "labels": {
        "background": 0, "x": 1}, "file_ending": None}, "channel_names list": {"channel_names": ["T1"], "labels": {
            "background": 0, "x": 1}, "file_ending": ".nii.gz"}}
    for k, (label, meta) in enumerate(variants.items()):
        ds = c.dir("c1", f"Dataset90{k}_Bad")
        for sub, name in (("imagesTr", "a_0000.nii.gz"), ("imagesTr", "b_0000.nii.gz")):
            nifti(ds / sub / name, blob(seed=k))
        for name in ("a.nii.gz", "b.nii.gz"):
            nifti(ds / "labelsTr" / name, (blob(seed=k) > 100).astype(np.uint8))
        (ds / "dataset.json").write_text(json.dumps(meta))
        case = c.case(1, f"dataset.json {label}")
        expect_refusal(case, c.cli(case, "preprocess", ds, base / f"o_ds{k}", "--no-progress"), "dataset.json")
        if not c.quick or k == 0:
            expect_refusal(case, c.cli(case, "finetune", "--checkpoint", fx.run, "--dataset", ds, "--out",
                                       base / f"o_dsft{k}", "--no-progress"), "dataset.json")
        # evaluate reads only dataset.json's labels: it must name dataset.json when they are unusable
        ev = c.cli(case, "evaluate", ds / "labelsTr", ds / "labelsTr", "--out", base / f"o_dsev{k}" / "m.json",
                   "--no-progress", "--workers", "1")
        if not isinstance(meta, dict):
            expect_refusal(case, ev, "dataset.json")
        elif ev.rc != 0 and not ev.timed_out:
            case.fail(f"evaluate with usable labels in dataset.json: exit {ev.rc}: {ev.last_error_line}")
        if k == 0:  # the broken dataset nested in a folder with a good file
            parent = c.dir("c1", "nested")
            nifti(parent / "good.nii.gz", blob(seed=5))
            if not (parent / ds.name).exists():
                shutil.copytree(ds, parent / ds.name)
            run = c.cli(case, "preprocess", parent, base / "o_nested", "--plan", "xnt", "--no-progress")
            if run.rc == 2:
                expect_refusal(case, run, "dataset.json")
            else:
                check_preprocess(case, run, base / "o_nested", {"good": "ok"}, ok_rc=(0, 3))
                if "dataset.json" not in run.text:
                    case.fail("a nested dataset with a malformed dataset.json was skipped silently", "silent")


# ---------------------------------------------------------------------------------------------- 2. named pipes


def class_pipes(c: Corpus, fx: Fixtures) -> None:
    base = c.dir("c2")
    src = c.dir("c2", "src")
    nifti(src / "good_a.nii.gz", blob(seed=1))
    nifti(src / "good_b.nii", blob(seed=2))
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(blob(seed=3)), str(src / "good_c.mha"))
    for name in ("fifo_t.tif", "fifo_m.mha", "fifo_n.nii.gz", "fifo_r.nrrd"):
        fifo(src / name)
    import zarr

    z = zarr.open_array(src / "fifo_z.zarr", mode="w", shape=(16, 16, 16), chunks=(8, 8, 8), dtype="f4",
                        zarr_format=2)
    z[:] = blob((16, 16, 16))
    (src / "fifo_z.zarr" / ".zarray").unlink()  # the Zarr metadata is a named pipe
    fifo(src / "fifo_z.zarr" / ".zarray")
    ds = c.dir("c2", "src", "Dataset950_Pipes")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
                                                 "file_ending": ".nii.gz"}))
    nifti(ds / "imagesTr" / "ok_0000.nii.gz", blob(seed=4))
    nifti(ds / "labelsTr" / "ok.nii.gz", (blob(seed=4) > 100).astype(np.uint8))
    nifti(ds / "imagesTr" / "pl_0000.nii.gz", blob(seed=6))
    fifo(ds / "labelsTr" / "pl.nii.gz")
    fifo(ds / "imagesTr" / "pi_0000.nii.gz")
    expect = {"good_a": "ok", "good_b": "ok", "good_c": "ok", "fifo_t": "excluded", "fifo_m": "excluded",
              "fifo_n": "excluded", "fifo_r": "excluded", "fifo_z": "excluded", "Dataset950_Pipes_ok": "ok",
              "Dataset950_Pipes_pl": "excluded", "Dataset950_Pipes_pi": "excluded"}
    plans = {"xnt": ["--plan", "xnt"], "default": RULES_OFF}
    for label, opts in plans.items():
        for workers in ("1", "2") if not c.quick else ("2",):
            case = c.case(2, f"preprocess --plan {label}, {workers} worker(s)")
            out = base / f"o_{label}_{workers}"
            run = c.cli(case, "preprocess", src, out, *opts, "--workers", workers, "--spacing", "1,1,1",
                        "--no-progress", timeout=90)
            check_preprocess(case, run, out, expect)
            if not run.timed_out:
                reasons = " ".join(e.get("reason", "") for e in preprocess_result(out)[1].values())
                if "named pipe" not in reasons:
                    case.fail("no exclusion reason says 'named pipe'", "silent")
    pin = c.dir("c2", "pred")
    fx.predict_case(pin, "good")
    fx.predict_case(pin, "piped")
    (pin / "piped_0001.nii.gz").unlink()
    fifo(pin / "piped_0001.nii.gz")
    fifo(pin / "alone_0000.mha")
    case = c.case(2, "predict: named pipes among the inputs")
    fx.predict(case, pin, base / "o_pred", {"good": "ok", "piped": "failed", "alone": "failed"})
    pred, ref = c.dir("c2", "ev", "pred"), c.dir("c2", "ev", "ref")
    for d in (pred, ref):
        nifti(d / "good.nii.gz", (blob() > 100).astype(np.uint8))
    nifti(ref / "piped.nii.gz", (blob() > 100).astype(np.uint8))
    fifo(pred / "piped.nii.gz")
    case = c.case(2, "evaluate: a named pipe among the predictions")
    evaluate(c, case, pred, ref, base / "o_ev", good=["good"], bad=["piped"])

    # a named pipe where a command reads one file of its own: dataset.json, the model, latest.pt (class 4)
    ds = c.dir("c2", "Dataset951_PipeJson")
    nifti(ds / "imagesTr" / "a_0000.nii.gz", blob(seed=7))
    nifti(ds / "labelsTr" / "a.nii.gz", (blob(seed=7) > 100).astype(np.uint8))
    fifo(ds / "dataset.json")
    case = c.case(2, "dataset.json is a named pipe")
    expect_refusal(case, c.cli(case, "preprocess", ds, base / "o_dsfifo", "--no-progress", timeout=60),
                   "dataset.json", "named pipe")
    expect_refusal(case, c.cli(case, "finetune", "--checkpoint", fx.run, "--dataset", ds, "--out", base / "o_ftfifo",
                               "--no-progress", timeout=60), "dataset.json", "named pipe")
    expect_refusal(case, c.cli(case, "evaluate", ds / "labelsTr", ds / "labelsTr", "--out",
                               base / "o_evfifo" / "m.json",
                               "--no-progress", timeout=60), "dataset.json")
    model = fifo(base / "model.pt")
    case = c.case(2, "predict --model / finetune --checkpoint is a named pipe")
    expect_refusal(case, c.cli(case, "predict", "--model", model, "--input", fx.raw / "imagesTs", "--output",
                               base / "o_mfifo", "--no-progress", timeout=60), "named pipe")
    expect_refusal(case, c.cli(case, "finetune", "--checkpoint", model, "--dataset", fx.raw, "--out",
                               base / "o_cfifo", "--no-progress", timeout=60), "named pipe")


# ---------------------------------------------------------------------------------------------- 3. values, Zarr


def class_values(c: Corpus, fx: Fixtures) -> None:
    import zarr

    base = c.dir("c3")
    src = c.dir("c3", "src")
    nifti(src / "good.nii.gz", blob(seed=1))
    nifti(src / "good64.nii", blob(seed=2, dtype=np.float64))
    huge = blob(seed=3, dtype=np.float64)
    huge[5, 5, 5] = 1e39
    nifti(src / "f64_huge.nii", huge)
    neg = blob(seed=4, dtype=np.float64)
    neg[1:4, 1:4, 1:4] = -3e300
    nifti(src / "f64_neg.nii.gz", neg)
    scaled = nib.Nifti1Image(np.full((32, 32, 32), 30000, np.int16), np.eye(4))
    scaled.header.set_slope_inter(1e36, 0)  # int16 x 1e36: beyond float32 through the header's scaling
    nib.save(scaled, str(src / "scl_huge.nii"))
    for name, value in (("f32_nan", np.nan), ("f32_inf", np.inf)):
        d = blob(seed=5)
        d[7, 7, 7] = value
        nifti(src / f"{name}.nii.gz", d)
    zyx = blob((24, 24, 24), seed=6)
    for fmt in (2, 3):
        for broken in ("deleted", "damaged"):
            path = src / f"zarr{fmt}_{broken}.zarr"
            z = zarr.open_array(path, mode="w", shape=zyx.shape, chunks=(8, 8, 8), dtype="f4", zarr_format=fmt)
            z[:] = zyx
            chunk = path / ("1.0.1" if fmt == 2 else "c/1/0/1")
            if broken == "deleted":
                chunk.unlink()
            else:
                chunk.write_bytes(b"\x00garbage" * 8)
    z = zarr.open_array(src / "zarr_good.zarr", mode="w", shape=zyx.shape, chunks=(8, 8, 8), dtype="f4",
                        zarr_format=2)
    z[:] = zyx
    expect = {"good": "ok", "good64": "ok", "f64_huge": "excluded", "f64_neg": "excluded", "scl_huge": "excluded",
              "f32_nan": "excluded", "f32_inf": "excluded", "zarr_good": "ok"}
    expect.update({f"zarr{f}_{b}": "excluded" for f in (2, 3) for b in ("deleted", "damaged")})
    for label, opts in {"xnt": ["--plan", "xnt"], "default": RULES_OFF}.items():
        case = c.case(3, f"preprocess --plan {label}")
        out = base / f"o_{label}"
        run = c.cli(case, "preprocess", src, out, *opts, "--spacing", "1,1,1", "--workers", "2", "--no-progress")
        check_preprocess(case, run, out, expect)
    case = c.case(3, "preprocess --zarr-allow-missing-chunks")
    out = base / "o_allow"
    run = c.cli(case, "preprocess", src, out, "--plan", "xnt", "--spacing", "1,1,1", "--workers", "1",
                "--zarr-allow-missing-chunks", "--no-progress")
    check_preprocess(case, run, out, {**expect, "zarr2_deleted": "warn", "zarr3_deleted": "warn"})
    pin = c.dir("c3", "pred")
    fx.predict_case(pin, "good")
    fx.predict_case(pin, "huge")
    img = nib.load(str(pin / "huge_0000.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float64)
    data[10, 10, 10] = 1e39
    (pin / "huge_0000.nii.gz").unlink()
    nifti(pin / "huge_0000.nii", data, img.affine)
    fx.predict_case(pin, "nan")
    img = nib.load(str(pin / "nan_0001.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[10, 10, 10] = np.nan
    nifti(pin / "nan_0001.nii.gz", data, img.affine)
    case = c.case(3, "predict: beyond float32 / NaN inputs")
    fx.predict(case, pin, base / "o_pred", {"good": "ok", "huge": "failed", "nan": "failed"})


# ---------------------------------------------------------------------------------------------- 4. resume


def _scalars(run_dir: Path) -> dict[int, str]:
    path = run_dir / "scalars.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {int(r["step"]): r["loss"] for r in csv.DictReader(fh)}


def _ckpt_meta(path: Path) -> tuple[int, float] | None:
    """(step, best metric) of a checkpoint, or None when it does not load."""
    from volssl.training.checkpoint import load_checkpoint

    try:
        s = load_checkpoint(path)
    except Exception:
        return None
    return int(s["step"]), float((s.get("metrics") or {}).get("best", float("inf")))


def class_resume(c: Corpus, fx: Fixtures) -> None:
    ref_rows = _scalars(fx.run)
    ref_best = _ckpt_meta(fx.run / "checkpoints" / "best.pt")
    if len(ref_rows) != fx.steps or ref_best is None:
        raise SystemExit(f"the reference run {fx.run} has {len(ref_rows)} scalars rows / no best.pt")

    def breaks(kind: str) -> Callable[[Path], None]:
        def apply(latest: Path) -> None:
            if kind == "missing":
                latest.unlink()
            elif kind == "dangling link":
                latest.unlink()
                os.symlink(latest.parent / "gone.pt", latest)
            elif kind == "a folder":
                latest.unlink()
                latest.mkdir()
                (latest / "data.pkl").write_text("x")
            elif kind == "bit-flipped":
                flip_tensor_bit(latest)
            elif kind == "a named pipe":
                latest.unlink()
                os.mkfifo(latest)
        return apply

    kinds = ["missing", "dangling link", "a folder", "bit-flipped", "a named pipe"]
    scenarios = [(k, True) for k in kinds] + ([] if c.quick else [(k, False) for k in kinds[:4]])
    for kind, keep_final in scenarios:
        name = f"latest.pt {kind}" + ("" if keep_final else ", final.pt gone")
        case = c.case(4, name)
        run_dir = c.out / "c4" / re.sub(r"[^a-z]+", "_", name)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(fx.run, run_dir, symlinks=True)
        breaks(kind)(run_dir / "checkpoints" / "latest.pt")
        if not keep_final:
            (run_dir / "checkpoints" / "final.pt").unlink()
        # with final.pt kept, the run is continued to 8 steps; without, it redoes its last steps to 6
        steps = fx.steps + 2 if keep_final else fx.steps
        args = [a if a != f"train.steps={fx.steps}" else f"train.steps={steps}" for a in map(str, fx.pretrain_args)]
        run = c.cli(case, "pretrain", "--resume", "--out", run_dir, *args, timeout=300)
        if run.timed_out or "Traceback" in run.text:
            continue
        if run.rc != 0:
            case.fail(f"resume exit {run.rc}: {run.last_error_line}")
            continue
        m = re.search(r"resuming from \S+ \(step (\d+)\)", run.text)
        if not m:
            case.fail("resumed without a warning naming the checkpoint it continued from", "silent")
            continue
        start = int(m.group(1))
        rows = _scalars(run_dir)
        kept = [s for s in range(1, start + 1) if rows.get(s) != ref_rows.get(s)]
        if kept:
            case.fail(f"scalars.csv rows {kept} (before the resume step {start}) lost or changed", "lost")
        if sorted(rows) != list(range(1, steps + 1)):
            case.fail(f"scalars.csv steps {sorted(rows)} after the resume, expected 1..{steps}", "lost")
        redone = [s for s in range(start + 1, fx.steps + 1) if rows.get(s) != ref_rows.get(s)]
        if redone:
            case.fail(f"redone steps {redone} differ from the uninterrupted run (not bit-identical)")
        best = _ckpt_meta(run_dir / "checkpoints" / "best.pt")
        if best is None or best[0] < ref_best[0] or best[1] > ref_best[1]:
            case.fail(f"best.pt {best} replaced by an earlier or worse state than {ref_best}", "lost")
        if start < steps and not (run_dir / "checkpoints" / "latest.pt").is_file():
            case.fail("no new latest.pt written")

    # nothing intact: refused, nothing changed
    case = c.case(4, "no intact checkpoint")
    run_dir = c.out / "c4" / "nothing_intact"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(fx.run, run_dir, symlinks=True)
    ck = run_dir / "checkpoints"
    (ck / "latest.pt").unlink()
    (ck / "final.pt").unlink()
    flip_tensor_bit(ck / "best.pt")
    before = {p: sha(p) for p in (run_dir / "scalars.csv", ck / "best.pt")}
    run = c.cli(case, "pretrain", "--resume", "--out", run_dir, *fx.pretrain_args, timeout=300)
    expect_refusal(case, run, "no intact checkpoint")
    for p, h in before.items():
        if sha(p) != h:
            case.fail(f"{p} changed by a refused resume", "lost")


# ---------------------------------------------------------------------------------------------- 5. memory


def class_memory(c: Corpus, fx: Fixtures) -> None:
    base = c.dir("c5")
    files = {
        "bomb": lambda p: gzip_bomb(p, (1024, 1024, 1024)),
        "bomb_small_header": lambda p: gzip_bomb(p, (64, 64, 64)),
        "liar_gz": lambda p: header_liar(p),
        "liar_plain": lambda p: header_liar(p),
    }
    suffix = {"liar_plain": ".nii"}
    for name, make in files.items():
        if c.quick and name == "liar_plain":
            continue
        src = c.dir("c5", name)
        path = make(src / f"{name}{suffix.get(name, '.nii.gz')}")
        nifti(src / "good.nii.gz", blob(seed=1))
        mb = path.stat().st_size / 1e6
        case = c.case(5, f"preprocess: {name} ({mb:.1f} MB)")
        out = base / f"o_{name}"
        run = c.cli(case, "preprocess", src, out, "--plan", "xnt", "--workers", "1", "--no-progress", timeout=180)
        check_preprocess(case, run, out, {"good": "ok", name: "excluded"})
        if case.peak_mb is not None and case.peak_mb > PEAK_LIMIT_MB:
            case.fail(f"peak memory {case.peak_mb:.0f} MB > {PEAK_LIMIT_MB:.0f} MB")
        if name == "liar_gz":  # without a voxel limit the data are still read with a bound
            case = c.case(5, f"preprocess --max-voxels off: {name}")
            out = base / f"o_{name}_off"
            run = c.cli(case, "preprocess", src, out, "--plan", "xnt", "--workers", "1", "--max-voxels", "off",
                        "--no-progress", timeout=180)
            check_preprocess(case, run, out, {"good": "ok", name: "excluded"})
            if case.peak_mb is not None and case.peak_mb > PEAK_LIMIT_MB:
                case.fail(f"peak memory {case.peak_mb:.0f} MB > {PEAK_LIMIT_MB:.0f} MB")
    pin = c.dir("c5", "pred")
    fx.predict_case(pin, "good")
    fx.predict_case(pin, "bomb")
    (pin / "bomb_0000.nii.gz").unlink()
    gzip_bomb(pin / "bomb_0000.nii.gz", (1024, 1024, 1024))
    case = c.case(5, "predict: a gzip bomb among the inputs")
    fx.predict(case, pin, base / "o_pred", {"good": "ok", "bomb": "failed"})
    if case.peak_mb is not None and case.peak_mb > PEAK_LIMIT_MB + 400:  # torch itself takes ~400 MB
        case.fail(f"peak memory {case.peak_mb:.0f} MB")
    pred, ref = c.dir("c5", "ev", "pred"), c.dir("c5", "ev", "ref")
    for d in (pred, ref):
        nifti(d / "good.nii.gz", (blob() > 100).astype(np.uint8))
    nifti(ref / "bomb.nii.gz", (blob() > 100).astype(np.uint8))
    nifti(ref / "liar.nii.gz", (blob() > 100).astype(np.uint8))
    nifti(ref / "bomb_small_header.nii.gz", (blob() > 100).astype(np.uint8))
    gzip_bomb(pred / "bomb.nii.gz", (1024, 1024, 1024))
    gzip_bomb(pred / "bomb_small_header.nii.gz", (32, 32, 32))  # the reference's shape, then 1 GiB more
    header_liar(pred / "liar.nii.gz")
    case = c.case(5, "evaluate: gzip bombs and a header liar as predictions")
    evaluate(c, case, pred, ref, base / "o_ev", good=["good"], bad=["bomb", "bomb_small_header", "liar"])
    if case.peak_mb is not None and case.peak_mb > PEAK_LIMIT_MB:
        case.fail(f"peak memory {case.peak_mb:.0f} MB > {PEAK_LIMIT_MB:.0f} MB")


# ---------------------------------------------------------------------------------------------- 6. silent acceptance


def class_silent(c: Corpus, fx: Fixtures) -> None:
    import SimpleITK as sitk

    base = c.dir("c6")
    src = c.dir("c6", "src")
    nifti(src / "good.nii.gz", blob(seed=1))
    nifti(src / "cplx.nii", (blob() + 1j * blob(seed=2)).astype(np.complex64))
    nifti(src / "cplx128.nii.gz", (blob() + 1j * blob(seed=2)).astype(np.complex128))
    sitk.WriteImage(sitk.GetImageFromArray((blob() + 1j).astype(np.complex64)), str(src / "cplx_itk.mha"))
    patched_nifti(src / "pix_zero.nii", blob(seed=3), (0, 0, 0), 1, 0)
    patched_nifti(src / "pix_neg.nii", blob(seed=4), (1, -2, 1), 1, 0)
    patched_nifti(src / "pix_zero_s.nii", blob(seed=5), (0, 1, 1), 0, 2)
    patched_nifti(src / "nogeo.nii", blob(seed=6), (0, 0, 0), 0, 0)
    sitk.WriteImage(sitk.GetImageFromArray(blob(seed=7)), str(src / "t.mha"))
    text = (src / "t.mha").read_bytes()
    (src / "t.mha").unlink()
    (src / "sp_zero.mha").write_bytes(text.replace(b"ElementSpacing = 1 1 1", b"ElementSpacing = 0 1 1"))
    nifti(src / "empty_axis.nii.gz", np.zeros((32, 32, 0), np.float32))
    nan_affine = nifti(src / "nan_affine.nii", blob(seed=8))
    raw = bytearray(nan_affine.read_bytes())
    raw[252:256] = struct.pack("<2h", 0, 1)  # sform only, and its first entry NaN
    raw[280:284] = struct.pack("<f", float("nan"))
    nan_affine.write_bytes(bytes(raw))
    expect = {"good": "ok", "cplx": "excluded", "cplx128": "excluded", "cplx_itk": "excluded",
              "pix_zero": "excluded", "pix_neg": "excluded", "pix_zero_s": "excluded", "sp_zero": "excluded",
              "nogeo": "warn", "empty_axis": "excluded", "nan_affine": "excluded"}
    for label, opts in {"xnt": ["--plan", "xnt"], "default": RULES_OFF}.items():
        case = c.case(6, f"dtype/geometry, preprocess --plan {label}")
        out = base / f"o_geo_{label}"
        check_preprocess(case, c.cli(case, "preprocess", src, out, *opts, "--workers", "1", "--no-progress"), out,
                         expect)

    ds = c.dir("c6", "Dataset960_Odd")
    (ds / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {
        "background": 0, "lesion": 1}, "file_ending": ".nii.gz", "numTraining": 6}))
    lab = np.zeros((32, 32, 32), np.uint8)
    lab[8:16, 8:16, 8:16] = 1
    for cid in ("good", "onechan", "threechan", "half", "nolabel"):
        nifti(ds / "imagesTr" / f"{cid}_0000.nii.gz", blob(seed=11))
        if cid != "onechan":
            nifti(ds / "imagesTr" / f"{cid}_0001.nii.gz", blob(seed=12))
    nifti(ds / "imagesTr" / "threechan_0002.nii.gz", blob(seed=13))
    for cid in ("good", "onechan", "threechan"):
        nifti(ds / "labelsTr" / f"{cid}.nii.gz", lab)
    half = lab.astype(np.float32)
    half[9, 9, 9] = 1.5
    nifti(ds / "labelsTr" / "half.nii.gz", half)
    nifti(ds / "labelsTr" / "orphan.nii.gz", lab)
    case = c.case(6, "nnU-Net dataset: labels, channels, orphans")
    out = base / "o_ds"
    run = c.cli(case, "preprocess", ds, out, *RULES_OFF, "--workers", "1", "--no-progress")
    check_preprocess(case, run, out, {"good": "ok", "onechan": "excluded", "threechan": "excluded",
                                      "half": "excluded", "nolabel": "warn"})
    if run.rc == 0:
        warnings = preprocess_result(out)[2]
        if not any(w.get("rule") == "orphan_label" and "orphan" in str(w.get("path")) for w in warnings):
            case.fail("orphan label: no warning", "silent")
        if "orphan" not in run.stdout:
            case.fail("orphan label: the warning is not printed", "silent")

    pin = c.dir("c6", "pred")
    fx.predict_case(pin, "good")
    shutil.copy(pin / "good_0000.nii.gz", pin / "onechan_0000.nii.gz")
    fx.predict_case(pin, "pixzero")
    for k in range(3):
        data = np.asarray(nib.load(str(pin / f"pixzero_{k:04d}.nii.gz")).dataobj)
        (pin / f"pixzero_{k:04d}.nii.gz").unlink()
        patched_nifti(pin / f"pixzero_{k:04d}.nii", data, (0, 0, 0), 1, 0)
    fx.predict_case(pin, "cplx")
    nifti(pin / "cplx_0002.nii.gz", (blob(fx.shape) + 1j).astype(np.complex64), fx.affine)
    case = c.case(6, "predict: channel mismatch, zero pixdim, complex")
    fx.predict(case, pin, base / "o_pred", {"good": "ok", "onechan": "failed", "pixzero": "failed",
                                            "cplx": "failed"})

    pred, ref = c.dir("c6", "ev", "pred"), c.dir("c6", "ev", "ref")
    for cid, bad in (("good", None), ("with255", 255), ("minus1", -1)):
        r = lab.astype(np.int16)
        if bad is not None:
            r[0:4, 0:4, 0:4] = bad
        nifti(ref / f"{cid}.nii.gz", r)
        nifti(pred / f"{cid}.nii.gz", lab)
    nifti(pred / "halfpred.nii.gz", half)
    nifti(ref / "halfpred.nii.gz", lab)
    case = c.case(6, "evaluate: 255 / -1 references, a 1.5 prediction")
    m = evaluate(c, case, pred, ref, base / "o_ev", good=["good", "with255", "minus1"], warned=["with255", "minus1"])
    if m is not None:
        scored = {x.get("case") for x in m.get("cases", [])}
        said = json.dumps(m.get("errors", [])) + json.dumps(m.get("warnings", []))
        if "halfpred" not in said:
            case.fail("evaluate: a prediction with label 1.5 " + ("scored" if "halfpred" in scored else "dropped")
                      + " without an error or warning", "silent")


# ---------------------------------------------------------------------------------------------- 7. kill -9


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        text = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def class_kill(c: Corpus) -> None:
    src = c.dir("c7", "src")
    n = 12 if c.quick else 24
    for k in range(n):
        if not (src / f"v{k:02d}.nii.gz").exists():
            nifti(src / f"v{k:02d}.nii.gz", blob((40, 40, 40), seed=k), np.diag([1.0, 1.0, 1.0, 1.0]))
    for attempt in range(2 if c.quick else 3):
        case = c.case(7, f"kill -9 of the main preprocess process ({attempt + 1})")
        out = c.out / "c7" / f"o{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        argv = [*c.volssl, "preprocess", str(src), str(out), *RULES_OFF, "--target-spacing", "0.4,0.4,0.4",
                "--workers", "2", "--no-progress"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=c.env,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            workers: list[int] = []
            while time.monotonic() < deadline and proc.poll() is None:
                kids = _descendants(proc.pid)
                if len(kids) >= 3:  # forkserver (+ resource tracker) + workers
                    time.sleep(0.5 + attempt)  # at different points of the work
                    workers = _descendants(proc.pid)
                    break
                time.sleep(0.05)
            if proc.poll() is not None or not workers:
                case.fail("the run ended before its workers could be seen; inconclusive")
                continue
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            t0 = time.monotonic()
            while any(_alive(p) for p in workers) and time.monotonic() - t0 < 10:
                time.sleep(0.1)
            left = [p for p in workers if _alive(p)]
            if left:
                case.fail(f"{len(left)} of {len(workers)} processes outlived the killed main process by 10 s", "hang")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for p in _descendants(proc.pid) + [p for p in workers if _alive(p)]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# ---------------------------------------------------------------------------------------------- the table


def table(cases: list[Case]) -> str:
    head = ["class", "cases", "tracebacks", "hangs", "corrupt stored ok", "history lost", "silent",
            "good files processed", "peak MB", "failed cases"]
    rows = []
    for cls, title in CLASSES.items():
        cs = [x for x in cases if x.cls == cls]
        if not cs:
            continue
        good = [sum(x.good[0] for x in cs), sum(x.good[1] for x in cs)]
        peaks = [x.peak_mb for x in cs if x.peak_mb is not None]
        rows.append([f"{cls} {title}", len(cs), sum(x.traceback for x in cs), sum(x.hang for x in cs),
                     sum(x.corrupt for x in cs), sum(x.lost for x in cs), sum(x.silent for x in cs),
                     f"{good[0]}/{good[1]}" if good[1] else "-", f"{max(peaks):.0f}" if peaks else "-",
                     sum(bool(x.failures) for x in cs)])
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path,
                    help="work folder: new or empty, or an earlier run's (which is replaced)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer variants (1 worker count, fewer output and resume variants; about 4/5 of the time)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a command counts as hung")
    ap.add_argument("--classes", default="1,2,3,4,5,6,7", help="classes to run, e.g. 2,5")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    marker = out / ".robustness-corpus"
    if out.exists() and any(out.iterdir()) and not marker.is_file():
        raise SystemExit(f"{out} exists and is not an earlier corpus folder; give a new or empty --out")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    marker.write_text("made by scripts/robustness_corpus.py; replaced by its next run\n")
    c = Corpus(out, args.quick, args.timeout)
    wanted = {int(x) for x in args.classes.split(",")}
    t0 = time.monotonic()
    fx = Fixtures(c)
    print(f"fixtures ready in {time.monotonic() - t0:.0f} s", flush=True)
    steps = [(1, class_outputs), (2, class_pipes), (3, class_values), (4, class_resume), (5, class_memory),
             (6, class_silent), (7, lambda c, fx: class_kill(c))]
    for cls, fn in steps:
        if cls in wanted:
            t = time.monotonic()
            fn(c, fx)
            print(f"class {cls} ({CLASSES[cls]}) done in {time.monotonic() - t:.0f} s", flush=True)
    cases = [x for x in c.cases if x.cls in wanted]
    print()
    print(table(cases))
    peaks = [x for x in cases if x.cls == 5 and x.peak_mb is not None]
    if peaks:
        print("\nclass 5, peak memory of each command (process tree, VmHWM):")
        for x in peaks:
            print(f"  {x.peak_mb:6.0f} MB  {x.name}")
    failed = [x for x in cases if x.failures] + [x for x in c.cases if x.cls == 0 and x.failures]
    for x in failed:
        print(f"\nFAILED class {x.cls}: {x.name}")
        for f in x.failures:
            print(f"  - {f}")
    records = [{"class": x.cls, "case": x.name, "failures": x.failures, "traceback": x.traceback, "hang": x.hang,
                "corrupt": x.corrupt, "lost": x.lost, "silent": x.silent, "good": x.good, "peak_mb": x.peak_mb}
               for x in c.cases]
    (out / "results.json").write_text(json.dumps(records, indent=1))
    mode = "quick" if c.quick else "full"
    print(f"\n{len(cases)} cases, {len(failed)} failed, {time.monotonic() - t0:.0f} s ({mode}); "
          f"every case: {out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
