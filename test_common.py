"""Unit tests for common.py: the embeddings and image saving."""
import os

import pytest
import torch
from PIL import Image

import common


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


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    (tmp_path / "f").write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="could not write .*No space left.*previous one is kept"):
        common.atomic_write(tmp_path / "f", fail)
    assert os.listdir(tmp_path) == ["f"]
    assert (tmp_path / "f").read_text() == "old"
