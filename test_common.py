"""Unit tests for common.py."""
import argparse
import os
import re
import signal

import pytest
import torch
from PIL import Image

import common
import dit_ddpm


def test_timestep_embedding_values():
    emb = common.timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    freqs = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]), atol=1e-6)


def test_pos_embed_2d_rows_and_columns():
    pe = common.pos_embed_2d(16, 3)  # (9, 16): first half depends on the row only, second on the column only
    assert pe.shape == (9, 16)
    assert torch.equal(pe[0, :8], pe[2, :8])  # the same row
    assert not torch.equal(pe[0, :8], pe[3, :8])  # another row
    assert torch.equal(pe[0, 8:], pe[3, 8:])  # the same column
    assert not torch.equal(pe[0, 8:], pe[1, 8:])  # another column


def test_grid_layout_and_loss_files(tmp_path):
    x = torch.zeros(20, 1, 28, 28)
    x[3] = 1  # image 3: row 0, column 3
    img = common.to_image(x, nrow=10, scale=1)
    assert img.size == (10 * 30 + 2, 2 * 30 + 2)  # 2 px lines around and between
    assert img.mode == "L"
    assert img.getpixel((2 + 3 * 30 + 5, 2 + 5)) == 255  # inside image 3
    assert img.getpixel((2 + 4 * 30 + 5, 2 + 5)) == 0  # inside image 4
    assert img.getpixel((1, 1)) == 255  # a line
    assert common.to_image(torch.rand(4, 3, 8, 8), 2).mode == "RGB"
    common.save_loss([(1, 1.0), (2, 0.5), (3, 0.25)], tmp_path, "t")
    assert (tmp_path / "loss.csv").read_text() == "step,loss\n1,1.000000\n2,0.500000\n3,0.250000\n"
    png = Image.open(tmp_path / "loss.png").convert("L")
    assert png.size == (640, 400)  # the curve runs from the top-left corner of the box to its bottom-right one

    def dark(x, y):  # a dark pixel in the 3x3 around (x, y)
        return min(png.getpixel((x + i, y + j)) for i in (-1, 0, 1) for j in (-1, 0, 1)) < 200
    assert dark(60, 51) and dark(320, 200) and dark(580, 349)  # on the curve
    assert not dark(580, 60) and not dark(60, 340)  # off it


def test_device_errors():
    assert common.pick_device("cpu") == (0, 1, torch.device("cpu"))
    cuda_past_end = f"cuda:{torch.cuda.device_count()}"
    mps = "mps" * (not torch.backends.mps.is_available())  # "" (no name) where MPS exists
    for bad in ("gpu", "cpu:1", cuda_past_end, mps):
        with pytest.raises(common.UsageError, match="no such device"):
            common.pick_device(bad)


def test_ranged_types():
    p = common.Parser()
    p.add_argument("--n", type=common.size)
    p.add_argument("--p", type=common.fraction)
    p.add_argument("--lr", type=common.positive)
    assert vars(p.parse_args(["--n", "1", "--p", "0", "--lr", "1e-9"])) == {"n": 1, "p": 0.0, "lr": 1e-9}
    bad = [
        (["--n", "0"], "--n: must be >= 1 (got 0)"),
        (["--p", "1"], "--p: must be >= 0 and < 1"),
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "nan"], "--lr"),
        (["--n", "x"], "--n"),
    ]
    for argv, words in bad:
        with pytest.raises(common.UsageError, match=re.escape(words)):
            p.parse_args(argv)


def test_lr_schedule_and_ema():
    assert [common.lr_at(s, 1.0, 4, 104) for s in (0, 3)] == [0.25, 1.0]  # linear warm-up
    assert abs(common.lr_at(54, 1.0, 4, 104) - 0.5) < 1e-9  # cosine: half way at the middle
    assert common.lr_at(104, 1.0, 4, 104) < 1e-12  # and 0 at the end
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.clone() for p in a.parameters()]
    common.ema_update(a, b, step=0, decay=0.9999)  # at step 0 the decay is 1/10
    assert all(torch.allclose(e, 0.1 * e0 + 0.9 * m) for e0, e, m in zip(before, a.parameters(), b.parameters()))


def test_parse_args_quick_and_named_flags():
    a, ckpt = common.parse_args(dit_ddpm.get_parser, ["--quick", "--depth", "2"], dit_ddpm.QUICK, "dit_ddpm")
    assert ckpt is None
    assert a.depth == 2  # the flag beats --quick
    assert a.hidden_size == 96 and a.sampler == "dpm++"  # --quick's
    assert dit_ddpm.get_parser().parse_args([]).hidden_size == 384  # without --quick the defaults stay
    assert "--quick" in dit_ddpm.get_parser().format_help()


def test_checkpoints_never_hold_nan_and_load_without_code(tmp_path):
    ck = {"script": "s", "model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "step": 3, "args": {"lr": 1.0},
          "rng": [torch.get_rng_state()], "opt": {}, "loss_log": [(3, 0.5)], "loss_acc": (0.0, 0)}
    common.save_checkpoint(ck, tmp_path / "ok.pt")
    assert common.load_checkpoint(tmp_path / "ok.pt", "s")["step"] == 3
    with pytest.raises(common.UsageError, match="NaN/inf at step 3.*keeps the last good state") as e:
        common.save_checkpoint({**ck, "ema": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path / "ok.pt")
    assert e.value.code == 1
    assert os.listdir(tmp_path) == ["ok.pt"]
    torch.save({**ck, "args": argparse.Namespace(lr=1.0)}, tmp_path / "obj.pt")  # any class, even a harmless one
    with pytest.raises(common.UsageError, match="holds objects other than tensors"):
        common.load_checkpoint(tmp_path / "obj.pt", "s")


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    (tmp_path / "f").write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(common.UsageError, match="No space left.*previous one is kept"):
        common.atomic_write(tmp_path / "f", fail)
    assert os.listdir(tmp_path) == ["f"]
    assert (tmp_path / "f").read_text() == "old"


def test_stop_signals_set_a_flag_then_restore():
    before = signal.getsignal(signal.SIGTERM)
    with common.stop_signals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop
    assert signal.getsignal(signal.SIGTERM) is before
