"""describe_error: the type, message and innermost frame of a caught exception."""
from volssl.util.errors import describe_error


def _fail():
    raise ValueError("bad spacing")


def test_describe_error_names_type_message_and_frame():
    try:
        _fail()
    except ValueError as e:
        text = describe_error(e)
    assert text.startswith("ValueError: bad spacing at test_errors.py:")
    assert describe_error(KeyError("x")) == "KeyError: 'x'"  # never raised: no frame
