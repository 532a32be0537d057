"""Unit tests for ddpm_unet.py: the UNet, dit_ddpm.py's Diffusion in it, and the CIFAR-10 / unconditional CLI."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import common
import ddpm_unet as du
import dit_ddpm
from conftest import randomise, run_main

TINY = ["--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20", "--sample-steps", "3", "--batch-size",
        "16", "--log-every", "1", "--device", "cpu"]


def tiny_unet(img_size=28, channels=1, mults=(1, 2), attn_res=(), classes=0, base=8):
    torch.manual_seed(0)
    return du.UNet(img_size, channels, classes, base, mults, num_res_blocks=1, attn_res=attn_res, dropout=0.0)


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("size, channels, mults, attn_res, classes, padded", [
    (28, 1, (1, 2, 2), (), 0, 28),       # MNIST: 28, 14, 7, no padding
    (28, 1, (1, 2, 2, 2), (8,), 10, 32),  # a 4th level pads 28 -> 32
    (32, 3, (1, 2, 2), (16,), 0, 32),     # CIFAR-10
    (32, 3, (1, 2, 2, 2), (16,), 10, 32),
])
def test_shapes_and_zero_output(size, channels, mults, attn_res, classes, padded):
    m = tiny_unet(size, channels, mults, attn_res, classes)
    assert m.size == padded
    n_attn = sum(isinstance(b, du.SelfAttention) for b in m.modules())
    assert n_attn == 1 + 3 * len(attn_res)  # the middle, then 1 block down and 2 up at each --attn-res
    x = torch.randn(3, channels, size, size)
    t = torch.tensor([0, 7, 19])
    y = torch.tensor([1, 2, -1]) if classes else None
    out = m(x, t, y)
    assert out.shape == (3, channels, size, size)
    assert torch.count_nonzero(out) == 0  # zero output conv: the untrained UNet predicts exactly ε = 0
    out = randomise(m)(x, t, y)
    assert out.abs().sum() > 0 and torch.isfinite(out).all()


def test_blocks_start_as_identity():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6)
    emb = torch.randn(2, 32)
    blk = du.ResBlock(8, 8, 32, dropout=0.0, attn=True)  # zero conv2 and zero attention projection
    assert torch.equal(blk(x, emb), x)
    wider = du.ResBlock(8, 16, 32, dropout=0.0)
    assert torch.allclose(wider(x, emb), wider.skip(x), atol=1e-6)  # only the 1x1 skip projection is left


def test_attention_matches_explicit_formula():
    """One head over the 25 positions: x + W_o softmax(q kᵀ / √C) v, with q, k, v the thirds of the 1x1 qkv conv."""
    torch.manual_seed(0)
    attn = randomise(du.SelfAttention(8))
    x = torch.randn(2, 8, 5, 5)
    qkv = attn.qkv(attn.norm(x)).flatten(2)  # (N, 3C, HW)
    q, k, v = qkv[:, :8], qkv[:, 8:16], qkv[:, 16:]  # (N, C, HW) each
    w = torch.softmax(q.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)  # (N, HW, HW)
    ref = x + attn.proj((v @ w.transpose(1, 2)).view(2, 8, 5, 5))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_timestep_and_class_embedding():
    m = randomise(tiny_unet(classes=10))
    t = torch.tensor([0, 0, 500, 999])
    y = torch.tensor([3, 3, 3, 10])
    emb = m.embed(t, y)
    assert emb.shape == (4, 32)  # 4 * base channels
    assert torch.equal(emb[0], emb[1])  # the same (t, y)
    assert not torch.allclose(emb[1], emb[2])  # another t
    assert not torch.allclose(m.embed(t, torch.full_like(y, -1)), emb)  # the null label changes it too
    assert torch.equal(m.embed(t, torch.full_like(y, -1)), m.embed(t, torch.full_like(y, 10)))  # its row: the last
    assert torch.allclose(m.t_mlp(common.timestep_embedding(t, 8)) + m.y_embed(y), emb)
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = m(x, torch.tensor([1, 500]), torch.tensor([3, 3]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # the same image at another t: another ε


def test_tiny_unet_learns():
    torch.manual_seed(0)
    x0 = -torch.ones(8, 1, 28, 28)
    x0[:, :, 8:20, 12:16] = 1  # one bar
    m = tiny_unet()
    d = du.Diffusion(100, prediction="eps")
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = d.loss(m, x0, torch.zeros(8, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 1.0) < 0.1  # zero output: the loss starts at E[ε²] = 1
    assert np.mean(losses[-10:]) < 0.5 * losses[0]  # measured: 0.98 -> 0.19


# ----------------------------------------------------------------------------- the diffusion: dit_ddpm.py's
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_either_diffusion_trains_and_samples_either_model(sampler):
    """The UNet and dit_ddpm.py's DiT are sampled and trained alike by this script's Diffusion and by dit_ddpm.py's
    (the same maths, other defaults), for every sampler and target: neither reads the model's attributes."""
    torch.manual_seed(0)
    dit = dit_ddpm.DiT(28, 1, 10, patch_size=7, hidden_size=16, depth=1, num_heads=2, stem_channels=4)
    y = torch.tensor([0, 3])
    for m in (randomise(tiny_unet(classes=10)), randomise(dit)):
        for prediction in ("eps", "v"):
            ours, theirs = (mod.Diffusion(20, "cosine", prediction, 0.1, (0.5, 4.0)) for mod in (du, dit_ddpm))
            a, _ = ours.sample(m, (2, 1, 28, 28), y, 2.0, sampler, 5, 0.5, gen=torch.Generator().manual_seed(5))
            b, _ = theirs.sample(m, (2, 1, 28, 28), y, 2.0, sampler, 5, 0.5, gen=torch.Generator().manual_seed(5))
            assert torch.equal(a, b) and a.shape == (2, 1, 28, 28)
            torch.manual_seed(0)
            la = ours.loss(m, torch.rand(2, 1, 28, 28), y)
            torch.manual_seed(0)
            assert torch.equal(la, theirs.loss(m, torch.rand(2, 1, 28, 28), y))


def test_an_unconditional_unet_without_guidance_is_one_forward():
    m = randomise(tiny_unet())
    d = du.Diffusion(20)
    x = torch.randn(3, 1, 28, 28)
    y = torch.zeros(3, dtype=torch.long)
    calls = []
    m.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(d.guided(m, x, 7, y, None), m(x, torch.full((3,), 7)))  # scale None: no guidance
    assert len(calls) == 2
    for scale in (0.0, 3.0):  # guided: the labels change nothing, so neither does the scale
        assert torch.allclose(d.guided(m, x, 7, y, scale), m(x, torch.full((3,), 7)), atol=1e-6)
    x, _ = d.sample(m, (3, 1, 28, 28), y, None, "ddim", 4, gen=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 28, 28)
    assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------- CLI: CIFAR-10
def test_cli_cifar_conditional(fake_cifar, tmp_path):
    out = str(tmp_path / "run")
    argv = TINY + ["--dataset", "cifar10", "--data-dir", fake_cifar, "--out-dir", out, "--cond",
                   "--attn-res", "8", "--max-steps", "2", "--num-samples", "5", "--cfg-scales", "0", "3"]
    assert run_main(du, argv) == 0
    written = ["grid_e001_cfg0.png", "grid_e001_cfg3.png", "denoise_e001.gif", "ckpt.pt", "loss.csv", "loss.png",
               "samples.npz"]
    for f in written:
        assert os.path.isfile(os.path.join(out, f)), f
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (5, 3, 32, 32)
    assert list(s["y"]) == [0, 1, 2, 3, 4]
    assert float(s["cfg_scale"]) == 1.5  # --sample-cfg, not the first of --cfg-scales
    assert Image.open(os.path.join(out, "grid_e001_cfg3.png")).mode == "RGB"


def test_unconditional_outputs(fake_mnist, tmp_path):
    out = tmp_path / "run"
    argv = TINY + ["--data-dir", fake_mnist, "--out-dir", str(out), "--max-steps", "2", "--num-samples", "3"]
    assert run_main(du, argv) == 0
    assert {"grid_e001.png", "denoise_e001.gif"} <= set(os.listdir(out))  # one 10x10 grid, no CFG scales
    assert "y" not in np.load(out / "samples.npz").files
