"""Scalars (CSV + TensorBoard), CSV truncation on resume, preview PNGs."""
import matplotlib.image
import pytest
import torch

from volssl.training.logging import ScalarLogger, read_scalars, save_preview, truncate_csv


def test_csv_and_tensorboard_scalars_and_truncation_on_resume(tmp_path):
    log = ScalarLogger(tmp_path)
    for step in range(1, 6):
        log.log(step, {"loss": 1.0 / step, "lr": 0.01})
    log.close()
    rows = read_scalars(tmp_path / "scalars.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[1]["loss"] == pytest.approx(0.5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]

    log = ScalarLogger(tmp_path, resume_step=3)  # rows 4, 5 are redone by the resumed run
    log.log(4, {"loss": 9.0})
    log.close()
    rows = read_scalars(tmp_path / "scalars.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0
    with pytest.raises(ValueError, match="unknown scalar"):
        ScalarLogger(tmp_path / "x", tensorboard=False).log(1, {"lss": 1.0})


def test_truncate_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "scalars.csv"
    path.write_text("step,loss\n1,0.5\n2,0.4\n3,0.")
    truncate_csv(path, 10)
    assert path.read_text().splitlines() == ["step,loss", "1,0.5", "2,0.4"]


def test_preview_png_shows_every_panel(tmp_path):
    x = torch.linspace(0, 1, 16).view(1, 1, 16, 1, 1).expand(3, 1, 16, 16, 16).contiguous()
    previews = {"input": x, "masked": x * 0, "reconstruction": x * 0.5, "target": x}
    rgb = save_preview(tmp_path / "p" / "step_000010.png", previews, n_samples=2, title="t")
    png = matplotlib.image.imread(tmp_path / "p" / "step_000010.png")
    assert png.shape[:2] == rgb.shape[:2] and rgb.shape[2] == 3
    assert rgb.shape[1] > 1.5 * rgb.shape[0]  # 4 columns x 2 rows
    assert rgb.std() > 10  # not a blank image
    with pytest.raises(ValueError, match="previews"):
        save_preview(tmp_path / "bad.png", {"foo": x})
