"""Atomic, weights_only-loadable checkpoints and RNG state round trips."""
import random

import numpy as np
import pytest
import torch

from volssl.training import checkpoint as ck


def _payload(value: float) -> dict:
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()  # momentum buffers in the optimiser state
    torch.nn.init.constant_(net.weight, value)
    return {"kind": "pretrain", "network": net.state_dict(), "optimizer": opt.state_dict(), "step": 7,
            "rng": ck.rng_state(), "plan": None, "metrics": {"loss": 0.5}}


def test_roundtrip_loads_with_weights_only(tmp_path):
    path = ck.save_checkpoint(tmp_path / "latest.pt", **_payload(1.0))
    data = ck.load_checkpoint(path)
    assert data["format"] == "volssl" and data["version"] == ck.VERSION and data["step"] == 7
    assert torch.equal(data["network"]["weight"], torch.ones(2, 3))
    assert data["optimizer"]["param_groups"][0]["nesterov"] is True
    # the file itself is plain: torch's own weights_only loader accepts it
    torch.load(path, weights_only=True)


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ck.save_checkpoint(path, **_payload(1.0))
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half the bytes are on disk when the "kill" arrives
            fh.truncate(fh.seek(0, 2) // 2)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, **_payload(2.0))
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)["network"]["weight"], torch.ones(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"]  # no temporary left behind


def test_corrupt_foreign_and_unsafe_files_are_clear_errors(tmp_path):
    good = ck.save_checkpoint(tmp_path / "good.pt", **_payload(1.0))
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="torn.pt: corrupt"):
        ck.load_checkpoint(torn)
    foreign = tmp_path / "foreign.pt"
    torch.save({"network_weights": {}}, foreign)
    with pytest.raises(ValueError, match="not a volssl checkpoint"):
        ck.load_checkpoint(foreign)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "volssl", "obj": ck.Path("x")}, unsafe)  # an arbitrary Python object
    with pytest.raises(ValueError, match="weights_only"):
        ck.load_checkpoint(unsafe)
    with pytest.raises(FileNotFoundError):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_rng_states_roundtrip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ck.save_checkpoint(tmp_path / "r.pt", rng=ck.rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(ck.load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]
