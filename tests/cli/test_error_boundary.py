"""The error boundary of `volssl` (cli.main): one line `volssl <cmd>: error: ...`, the documented exit codes,
no traceback unless --debug; outputs checked before any work; bad inputs (missing, symbolic link loops)
named in words."""
import errno
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from volssl.cli import COMMAND_MODULES, EXTRA_COMMANDS, main, module_of


@pytest.fixture
def paths(tmp_path):
    """An existing file, an empty folder, a missing path and a symbolic link loop (a -> b -> a)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    return {"file": str(tmp_path / "afile"), "dir": str(tmp_path / "empty"), "missing": str(tmp_path / "missing"),
            "loop": str(tmp_path / "loop_a"), "tmp": tmp_path}


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"volssl {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------- the boundary


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


BOUNDARY_CASES = [
    (PermissionError(errno.EACCES, "Permission denied", "/x/y.json"), 4, "permission denied: /x/y.json"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), 4, "read-only file system: /mnt/ro/out"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/f.nii.gz"), 4, "no space left on the device: /d/f.nii.gz"),
    (OSError(errno.ELOOP, "Too many levels of symbolic links", "/a"), 2, "symbolic link loop"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/x.nii"), 2, "not found: /in/x.nii"),
    (FileExistsError(errno.EEXIST, "File exists", "/out"), 2, "already exists: /out"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/d"), 2, "is a folder, not a file: /d"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), 2, "is a file, not a folder: /f/x"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 4, "/a -> /b"),
    (json.JSONDecodeError("Expecting value", "{", 1), 2, "invalid JSON: Expecting value at line 1, column 2"),
    (KeyError("optim"), 2, "missing entry 'optim'"),
    (ValueError("bad spacing\n  in run.json"), 2, "bad spacing in run.json"),
    # pathlib's Path.resolve on a link loop (Python < 3.13): a user error in words, not a bug
    (RuntimeError("Symlink loop from '/in/a'"), 2, "symbolic link loop (a link that leads back to itself): /in/a"),
    (MemoryError(), 5, "out of memory"),
    (OSError(errno.EMFILE, "Too many open files"), 5, "too many open files"),
]


@pytest.mark.parametrize("exc,code,text", BOUNDARY_CASES, ids=[type(c[0]).__name__ + str(i)
                                                               for i, c in enumerate(BOUNDARY_CASES)])
def test_user_errors_end_with_one_line_and_their_exit_code(monkeypatch, capsys, paths, exc, code, text):
    monkeypatch.setattr("volssl.demo.run_demo", _raise(exc))
    assert main(["demo", "--out", str(paths["tmp"] / "demo")]) == code
    line = _one_error_line(capsys, "demo")
    assert text in line


def test_debug_flag_and_env_print_the_traceback(monkeypatch, capsys, paths):
    monkeypatch.setattr("volssl.demo.run_demo", _raise(PermissionError(errno.EACCES, "Permission denied", "/x")))
    out = str(paths["tmp"] / "demo")
    for argv in (["--debug", "demo", "--out", out], ["demo", "--out", out, "--debug"]):
        assert main(argv) == 4
        err = capsys.readouterr().err
        assert "Traceback" in err and err.rstrip().splitlines()[-1] == "volssl demo: error: permission denied: /x"
    monkeypatch.setenv("VOLSSL_DEBUG", "1")
    assert main(["demo", "--out", out]) == 4
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("VOLSSL_DEBUG", "0")
    assert main(["demo", "--out", out]) == 4
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_asks_to_report(monkeypatch, capsys, paths):
    monkeypatch.setattr("volssl.demo.run_demo", _raise(RuntimeError("boom")))
    assert main(["demo", "--out", str(paths["tmp"] / "demo")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: boom" in err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("volssl demo: internal error: RuntimeError: boom") and "report" in last


def test_interrupt_and_closed_stdout(monkeypatch, capsys, paths):
    monkeypatch.setattr("volssl.demo.run_demo", _raise(KeyboardInterrupt()))
    assert main(["demo", "--out", str(paths["tmp"] / "demo")]) == 130
    assert capsys.readouterr().err.strip() == "volssl demo: interrupted"
    monkeypatch.setattr("volssl.demo.run_demo", _raise(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    monkeypatch.setattr(os, "dup2", lambda *a: None)  # never touch the test's real stdout
    assert main(["demo", "--out", str(paths["tmp"] / "demo")]) == 141
    assert capsys.readouterr().err == ""


def test_each_command_module_is_found_for_a_fast_start():
    import argparse
    import importlib

    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"volssl.cli.{name}").register(sub)
        assert set(sub.choices) == set(EXTRA_COMMANDS.get(name, (name,))), name
        assert all(module_of(c) == name for c in sub.choices)


# ---------------------------------------------------------------------------------------------- per command


def _npy_affinities(folder):
    folder.mkdir()
    np.save(folder / "a.npy", np.full((3, 8, 8, 8), 0.9, np.float32))
    return str(folder)


def _labels_folder(folder):
    import nibabel as nib

    folder.mkdir()
    nib.save(nib.Nifti1Image(np.ones((6, 6, 6), np.uint8), np.eye(4)), str(folder / "c.nii.gz"))
    return str(folder)


def _command_lines(p):
    """(command, argv with an existing FILE as its output, argv with a missing input, argv with a link-loop input)."""
    t, f, d, miss, loop = p["tmp"], p["file"], p["dir"], p["missing"], p["loop"]
    affs = _npy_affinities(t / "affs")
    labels = _labels_folder(t / "labels")
    return [
        ("predict", ["predict", "--model", d, "--input", labels, "--output", f],
         ["predict", "--model", d, "--input", miss, "--output", str(t / "o")],
         ["predict", "--model", d, "--input", loop, "--output", str(t / "o")]),
        ("evaluate", ["evaluate", labels, labels, "--out", os.path.join(f, "metrics.json")],
         ["evaluate", miss, labels, "--out", str(t / "m.json")],
         ["evaluate", loop, labels, "--out", str(t / "m.json")]),
        ("report", ["report", d, "--out", f], ["report", miss, "--out", str(t / "r")],
         ["report", loop, "--out", str(t / "r")]),
        ("phantoms", ["phantoms", f, "--n", "1", "--shape", "16"], None, None),
        ("benchmark", ["benchmark", "--out", f], ["benchmark", "--datasets", miss, "--out", str(t / "b")],
         ["benchmark", "--unlabeled", loop, "--out", str(t / "b")]),
        ("search", ["search", "--space", "xnt-nuclei-tiny", "--dataset", d, "--out", f],
         ["search", "--space", "xnt-nuclei-tiny", "--dataset", miss, "--out", str(t / "s")],
         ["search", "--space", "xnt-nuclei-tiny", "--dataset", loop, "--out", str(t / "s")]),
        ("demo", ["demo", "--out", f], None, None),
        ("agglomerate", ["agglomerate", affs, f], ["agglomerate", miss, str(t / "g")],
         ["agglomerate", loop, str(t / "g")]),
        ("evaluate-instances", ["evaluate-instances", labels, labels, "--out", os.path.join(f, "m.json")],
         ["evaluate-instances", miss, labels, "--out", str(t / "m.json")],
         ["evaluate-instances", loop, labels, "--out", str(t / "m.json")]),
        ("probe", ["probe", "--checkpoint", d, "--dataset", d, "--work", f],
         ["probe", "--checkpoint", miss, "--dataset", d],
         ["probe", "--checkpoint", d, "--dataset", loop]),
    ]


def test_every_command_refuses_a_file_as_output_a_missing_input_and_a_link_loop(paths, capsys, monkeypatch):
    # none of them may get as far as the work
    monkeypatch.setattr("volssl.inference.predict.load_finetuned", _raise(AssertionError("model loaded")))
    monkeypatch.setattr("volssl.demo.run_demo", _raise(AssertionError("demo ran")))
    monkeypatch.setattr("volssl.benchmark.run_benchmark", _raise(AssertionError("benchmark ran")))
    monkeypatch.setattr("volssl.search.run_search", _raise(AssertionError("search ran")))
    monkeypatch.setattr("volssl.reports.report.make_report", _raise(AssertionError("report ran")))
    for command, out_file, missing, loop in _command_lines(paths):
        rc = main(out_file)
        line = _one_error_line(capsys, command)
        assert rc == 2 and paths["file"] in line and ("file" in line or "folder" in line), line
        if missing:
            assert main(missing) == 2
            line = _one_error_line(capsys, command)
            assert "not found" in line and paths["missing"] in line, line
        if loop:
            assert main(loop) == 2
            line = _one_error_line(capsys, command)
            assert "symbolic link loop" in line and paths["loop"] in line, line


def test_pretrain_finetune_predict_refuse_link_loops_and_pipes_as_inputs_before_any_work(paths, capsys,
                                                                                           monkeypatch):
    """Acceptance corpus: `pretrain --data LOOP` and `finetune --dataset LOOP` ended in a traceback (pathlib's
    RuntimeError from Path.resolve), `finetune --checkpoint LOOP` said "not found", and a named pipe given as
    the model or checkpoint was "not found" too. Each is now one line naming the path and what it is."""
    monkeypatch.setattr("volssl.training.trainer.pretrain", _raise(AssertionError("pre-training started")))
    import importlib

    finetune_module = importlib.import_module("volssl.finetuning.finetune")  # the package exports a same-named function
    monkeypatch.setattr(finetune_module, "finetune", _raise(AssertionError("fine-tuning started")))
    monkeypatch.setattr("volssl.inference.predict.load_finetuned", _raise(AssertionError("model loaded")))
    t, loop, d = paths["tmp"], paths["loop"], paths["dir"]
    os.mkfifo(t / "pipe.pt")
    pipe = str(t / "pipe.pt")
    cases = [
        ("pretrain", ["pretrain", "--preset", "s3d-b-tiny", "--data", loop, "--out", str(t / "r1")],
         "symbolic link loop"),
        ("finetune", ["finetune", "--checkpoint", d, "--dataset", loop, "--out", str(t / "f1")], "symbolic link loop"),
        ("finetune", ["finetune", "--checkpoint", loop, "--dataset", d, "--out", str(t / "f2")], "symbolic link loop"),
        ("finetune", ["finetune", "--checkpoint", pipe, "--dataset", d, "--out", str(t / "f3")], "named pipe (FIFO)"),
        ("predict", ["predict", "--model", pipe, "--input", d, "--output", str(t / "p1")], "named pipe (FIFO)"),
    ]
    for command, argv, words in cases:
        assert main(argv) == 2, argv
        line = _one_error_line(capsys, command)
        assert words in line and (loop in line or pipe in line), line


def test_an_output_that_is_a_link_loop_is_named_as_one(paths, capsys):
    """It was "a link to a missing target (loop_b)": a loop has a target, it just never ends."""
    from volssl.util.paths import check_output_dir

    with pytest.raises(ValueError, match="is a symbolic link loop"):
        check_output_dir(paths["loop"])
    assert main(["preprocess", paths["dir"], paths["loop"], "--no-progress"]) == 2
    assert "symbolic link loop" in _one_error_line(capsys, "preprocess")
    os.symlink(paths["tmp"] / "nowhere", paths["tmp"] / "dangling")
    with pytest.raises(ValueError, match="link to a missing target"):
        check_output_dir(paths["tmp"] / "dangling")


def test_predict_checks_its_output_before_loading_the_model(paths, capsys, monkeypatch):
    from volssl.inference.predict import PredictOptions, predict_folder

    monkeypatch.setattr("volssl.inference.predict.load_finetuned", _raise(AssertionError("model loaded")))
    labels = _labels_folder(paths["tmp"] / "in")
    t0 = time.perf_counter()
    assert main(["predict", "--model", paths["dir"], "--input", labels, "--output", paths["file"]]) == 2
    assert time.perf_counter() - t0 < 1.0
    assert "is an existing file" in _one_error_line(capsys, "predict")
    with pytest.raises(ValueError, match="existing file"):  # the library function too
        predict_folder(paths["dir"], labels, paths["file"], PredictOptions(device="cpu"), progress=False)


def test_predict_stops_when_the_output_cannot_be_written(tmp_path, capsys, monkeypatch):
    """A write refused inside the output folder stops the run (every later case would fail the same way
    after its work), with exit code 4 and the file named."""
    import torch

    from volssl.data.preprocess import PreprocessPlan
    from volssl.inference import predict as predict_module

    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros((x.shape[0], 2, *x.shape[2:]))

    model = predict_module.FineTunedModel(network=Zero(), plan=PreprocessPlan(name="t", target_spacing=None),
                                          labels={"background": 0, "x": 1}, channels=["c"], patch_size=(8, 8, 8))
    src = tmp_path / "in"
    _labels_folder(src)
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), np.eye(4)),
             str(src / "c.nii.gz"))
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((6, 6, 6)).astype(np.float32), np.eye(4)),
             str(src / "d.nii.gz"))
    out = tmp_path / "out"
    calls = []

    def refuse(path, *a, **k):
        calls.append(path)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(predict_module, "write_label_map", refuse)
    monkeypatch.setattr(predict_module, "load_finetuned", lambda *a, **k: model)
    assert main(["predict", "--model", str(tmp_path), "--input", str(src), "--output", str(out), "--no-mirror",
                 "--device", "cpu", "--no-progress"]) == 4
    assert len(calls) == 1  # stopped at the first refused write
    line = _one_error_line(capsys, "predict")
    assert line == f"volssl predict: error: permission denied: {out.resolve() / 'c.nii.gz'}"


def test_internal_texts_are_replaced_by_words(paths, capsys):
    d = paths["dir"]
    for command, argv, text in [
        ("evaluate", ["evaluate", d, d, "--out", str(paths["tmp"] / "m.json"), "--empty-score", "abc"],
         "--empty-score must be 'nan' or a number"),
        ("evaluate", ["evaluate", d, d, "--out", str(paths["tmp"] / "m.json"), "--labels", "one"],
         "--labels takes comma-separated"),
        ("benchmark", ["benchmark", "--seeds", "a,b", "--out", str(paths["tmp"] / "b")], "--seeds takes"),
        ("benchmark", ["benchmark", "--n-train", "few", "--out", str(paths["tmp"] / "b")], "--n-train 'few'"),
        ("benchmark", ["benchmark", "--finetune-set", "head_init=zero", "--out", str(paths["tmp"] / "b")],
         "--finetune-set head_init=zero"),
        ("benchmark", ["benchmark", "--finetune-set", "head_init", "--out", str(paths["tmp"] / "b")],
         "--finetune-set takes KEY=VALUE"),
        ("search", ["search", "--space", "xnt-nuclei-tiny", "--dataset", d, "--set", "optim.lr=fast"],
         "optim.lr"),
        ("search", ["search", "--space", "xnt-nuclei-tiny", "--dataset", d, "--set", "optim.lr"],
         "expected KEY=VALUE"),
        ("search", ["search", "--space", "nope", "--dataset", d], "unknown search space"),
    ]:
        assert main(argv) == 2
        line = _one_error_line(capsys, command)
        assert text in line, line
        assert "invalid literal" not in line and "could not convert" not in line
    assert not (paths["tmp"] / "b").exists()  # refused before the output folder was made
    with pytest.raises(SystemExit):  # argparse: a usage line and the reason in words
        main(["predict", "--model", d, "--input", d, "--output", d, "--batch", "many"])
    assert "expected a whole number >= 1, got 'many'" in capsys.readouterr().err


def test_end_to_end_one_line_and_debug_traceback(paths):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("VOLSSL_DEBUG", None)
    argv = [sys.executable, "-m", "volssl", "evaluate", paths["loop"], paths["dir"], "--out",
            str(paths["tmp"] / "m.json")]
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"volssl evaluate: error: prediction folder {paths['loop']} is a symbolic "
                                     "link loop (a link that leads back to itself)"]
    r = subprocess.run([*argv[:3], "--debug", *argv[3:]], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" in r.stderr
    r = subprocess.run([sys.executable, "-m", "volssl", "predict", "--model", paths["dir"], "--input", paths["dir"],
                        "--output", paths["file"]], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "existing file" in r.stderr
    assert time.perf_counter() - t0 < 30  # three starts; the output check itself imports no torch
