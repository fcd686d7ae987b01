"""Architecture registry and `volssl models`."""
import json

import pytest

from volssl.cli import main
from volssl.config import ModelConfig
from volssl.models.registry import ARCHITECTURES, build_model, count_parameters


def test_models_json_lists_every_architecture_with_parameter_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(ARCHITECTURES) and {"resenc-l", "resenc-tiny"} <= set(rows)
    assert abs(rows["resenc-l"]["params"] - 102.3e6) / 102.3e6 < 0.01
    assert rows["resenc-l"]["params"] == rows["resenc-l"]["encoder_params"] + rows["resenc-l"]["decoder_params"]
    assert rows["resenc-tiny"]["params"] < 2e6 and rows["resenc-tiny"]["total_stride"] == 8
    assert rows["resenc-tiny"]["params_paper"] is None


def test_models_table(capsys):
    assert main(["models"]) == 0
    assert "102.35M" in capsys.readouterr().out


def test_width_overrides_and_unknown_arch():
    small = build_model(ModelConfig(arch="resenc-tiny", features=(4, 8, 8), blocks=(1, 1, 1), strides=(1, 2, 2)))
    assert small.encoder.total_stride == 4 and small.encoder.output_channels == [4, 8, 8]
    assert count_parameters(small) < count_parameters(build_model(ModelConfig(arch="resenc-tiny")))
    with pytest.raises(KeyError, match="known: .*resenc-l"):
        build_model(ModelConfig(arch="resnet-50"))
    with pytest.raises(ValueError, match="same length"):
        build_model(ModelConfig(arch="resenc-tiny", features=(4, 8)))
