"""The Python API exposes the same functions as the CLI."""
import volssl


def test_every_public_name_resolves():
    for name in volssl.__all__:
        assert getattr(volssl, name) is not None, name


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError):
        volssl.not_a_function  # noqa: B018
