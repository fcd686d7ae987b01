"""describe_error: the type, message and innermost frame of a caught exception; check_input_path and
pathlib's link-loop error in words."""
import os

import pytest

from volssl.util.errors import check_input_path, describe_error, exit_code, symlink_loop_path, user_message


def _fail():
    raise ValueError("bad spacing")


def test_describe_error_names_type_message_and_frame():
    try:
        _fail()
    except ValueError as e:
        text = describe_error(e)
    assert text.startswith("ValueError: bad spacing at test_errors.py:")
    assert describe_error(KeyError("x")) == "KeyError: 'x'"  # never raised: no frame


@pytest.mark.timeout(60)
def test_check_input_path_refuses_a_named_pipe_without_opening_it(tmp_path):
    """Acceptance corpus: a named pipe given as --model / --checkpoint passed the check and was then "not
    found" (or, read, would block forever)."""
    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"--model .*model\.pt is a named pipe \(FIFO\), not a file or folder"):
        check_input_path(tmp_path / "model.pt", "--model")
    assert check_input_path(tmp_path, "--input", kind="dir") == tmp_path


def test_pathlibs_symlink_loop_runtime_error_is_a_user_error(tmp_path):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises((RuntimeError, OSError)) as raised:  # RuntimeError before Python 3.13, OSError (ELOOP) after
        (tmp_path / "a").resolve(strict=True)
    e = raised.value
    assert exit_code(e) == 2 and "symbolic link loop" in user_message(e) and str(tmp_path / "a") in user_message(e)
    assert symlink_loop_path(RuntimeError("Symlink loop from '/x/y'")) == "/x/y"
    assert symlink_loop_path(RuntimeError("boom")) is None and exit_code(RuntimeError("boom")) is None
