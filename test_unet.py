"""Tests for ddpm_unet.py: behaviour and numbers, CPU only, offline (fake datasets come from conftest.py)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import ddpm_unet as du
from conftest import run_main

TINY = ["--base-channels", "8", "--channel-mults", "1", "2", "2", "--num-res-blocks", "1", "--timesteps", "20",
        "--sample-steps", "3", "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


def tiny_unet(img_size=28, channels=1, mults=(1, 2), attn_res=(), classes=0, base=8):
    torch.manual_seed(0)
    return du.UNet(img_size, channels, base, mults, num_res=1, attn_res=attn_res, dropout=0.0, num_classes=classes)


def randomise(model):
    """Give the zero-initialised layers random weights so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


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
    x, t = torch.randn(3, channels, size, size), torch.tensor([0, 7, 19])
    y = torch.tensor([1, 2, 10]) if classes else None
    out = m(x, t, y)
    assert out.shape == (3, channels, size, size)
    assert torch.count_nonzero(out) == 0  # zero output conv: the untrained UNet predicts exactly ε = 0
    out = randomise(m)(x, t, y)
    assert out.abs().sum() > 0 and torch.isfinite(out).all()


def test_blocks_start_as_identity():
    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 32)
    blk = du.ResBlock(8, 8, 32, dropout=0.0, attn=True)  # zero conv2 and zero attention projection
    assert torch.equal(blk(x, emb), x)
    wider = du.ResBlock(8, 16, 32, dropout=0.0)
    assert torch.allclose(wider(x, emb), wider.skip(x), atol=1e-6)  # only the 1x1 skip projection is left


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = randomise(du.SelfAttention(8))
    x = torch.randn(2, 8, 5, 5)
    q, k, v = attn.qkv(attn.norm(x)).view(2, 3, 8, 25).transpose(2, 3).unbind(1)
    w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)  # softmax(QKᵀ/√C)
    ref = x + attn.proj((w @ v).transpose(1, 2).reshape(2, 8, 5, 5))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_timestep_and_class_embedding():
    m = randomise(tiny_unet(classes=10))
    t = torch.tensor([0, 0, 500, 999])
    y = torch.tensor([3, 3, 3, 10])
    emb = m.embed(t, y)
    assert emb.shape == (4, 32)  # 4 * base channels
    assert torch.equal(emb[0], emb[1]) and not torch.allclose(emb[1], emb[2])  # same (t, y), then another t
    assert not torch.allclose(m.embed(t, torch.full_like(y, 10)), emb)  # the null class changes it too
    assert torch.allclose(m.t_mlp(common.timestep_embedding(t, 8)) + m.y_embed(y), emb)
    x = torch.randn(1, 1, 28, 28).repeat(2, 1, 1, 1)
    out = m(x, torch.tensor([1, 500]), torch.tensor([3, 3]))
    assert not torch.allclose(out[0], out[1], atol=1e-4)  # the same image at another t: another ε


def test_hflip_mirrors_about_half():
    torch.manual_seed(0)
    x = torch.randn(400, 3, 4, 4)
    f = du.hflip(x)
    same = (f == x).flatten(1).all(1)
    mirrored = (f == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and 150 < mirrored.sum() < 250


def test_tiny_unet_learns():
    torch.manual_seed(0)
    x0 = -torch.ones(8, 1, 28, 28)
    x0[:, :, 8:20, 12:16] = 1  # one bar
    m, d = tiny_unet(), du.Diffusion(100)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        t = torch.randint(0, 100, (8,))
        eps = torch.randn_like(x0)
        loss = F.mse_loss(m(d.q_sample(x0, t, eps), t), eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 1.0) < 0.1  # zero output: the loss starts at E[ε²] = 1
    assert np.mean(losses[-10:]) < 0.5 * losses[0]  # measured: 0.98 -> 0.19


# ----------------------------------------------------------------------------- diffusion and sampling
def test_schedule_values():
    d = du.Diffusion(1000)
    assert torch.isclose(d.betas[0], torch.tensor(1e-4)) and torch.isclose(d.betas[-1], torch.tensor(0.02))
    assert 3e-5 < d.abar[-1] < 5e-5  # ᾱ_T for DDPM's schedule: exp(-Σβ) ≈ e^-10 ≈ 4.0e-5


def test_ddpm_variances():
    d = du.Diffusion(50)
    torch.manual_seed(0)
    x, eps, noise = torch.randn(3, 4, 1, 2, 2).unbind(0)
    for t in (49, 20, 1):
        post = d.betas[t] * (1 - d.abar[t - 1]) / (1 - d.abar[t])
        diff = d.ddpm_step(x, t, eps, noise, "beta") - d.ddpm_step(x, t, eps, noise, "posterior")
        assert torch.allclose(diff, (d.betas[t].sqrt() - post.sqrt()) * noise, atol=1e-6)  # σ = √β_t vs √β̃_t
        assert post < d.betas[t]
    for var in ("beta", "posterior"):  # the last step adds no noise, whichever variance
        assert torch.equal(d.ddpm_step(x, 0, eps, noise, var), d.ddpm_step(x, 0, eps, torch.zeros_like(x), var))


def test_ddim_eta1_all_steps_is_ddpm_posterior():
    d = du.Diffusion(20)
    torch.manual_seed(0)
    x, eps, noise = torch.randn(3, 4, 1, 2, 2).unbind(0)
    for t in (19, 5, 1, 0):
        assert torch.allclose(d.ddim_step(x, t, t - 1, eps, 1.0, noise), d.ddpm_step(x, t, eps, noise), atol=1e-5)
    m = randomise(tiny_unet(classes=10))  # and whole sampling runs with the same noise stream
    y = torch.tensor([0, 3])
    a, _ = du.sample(m, d, 2, y, 2.0, "ddpm", gen=torch.Generator().manual_seed(5))
    b, _ = du.sample(m, d, 2, y, 2.0, "ddim", steps=20, eta=1.0, gen=torch.Generator().manual_seed(5))
    c, _ = du.sample(m, d, 2, y, 2.0, "ddpm", var="beta", gen=torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # σ² = β_t is another sampler


def test_ddim_eta0_recovers_x0_with_oracle_eps():
    d = du.Diffusion(100)
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 1, 3, 3).unbind(0)
    xt = d.q_sample(x0, torch.tensor([80] * 4), eps)
    assert torch.allclose(d.ddim_step(xt, 80, 30, eps, 0.0, 0 * x0), d.q_sample(x0, torch.tensor([30] * 4), eps),
                          atol=1e-5)


def test_unconditional_sampling_and_cfg():
    m = randomise(tiny_unet())
    x, _ = du.sample(m, du.Diffusion(10), 3, steps=4, gen=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 28, 28) and x.abs().max() <= 1
    m = randomise(tiny_unet(classes=10))
    x, t, y = torch.randn(4, 1, 28, 28), torch.tensor([3, 5, 10, 19]), torch.tensor([0, 1, 2, 9])
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, 10))
    assert not torch.allclose(cond, null, atol=1e-4)
    assert torch.allclose(du.guided_eps(m, x, t, y, 1.0), cond, atol=1e-5)
    assert torch.allclose(du.guided_eps(m, x, t, y, 0.0), null, atol=1e-5)
    assert torch.allclose(du.guided_eps(m, x, t, y, 3.0), null + 3 * (cond - null), atol=1e-4)


# ----------------------------------------------------------------------------- CLI
def test_cli_mnist_train_resume_sample(fake_mnist, tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--epochs", "2", "--cfg-scales", "2"]
    assert run_main(du, args + ["--max-steps", "2"]) == 0
    assert sorted(os.listdir(out)) == ["ckpt.pt", "denoise_e001.gif", "grid_e001.png", "loss.csv", "loss.png"]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["script"] == "ddpm_unet" and ck["step"] == 2 and not ck["args"]["cond"]
    # resume: to the end of epoch 1 (256 / 16 = 16 steps) and 1 step into epoch 2
    assert run_main(du, args + ["--max-steps", "17", "--resume", os.path.join(out, "ckpt.pt")]) == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 17
    assert os.path.isfile(os.path.join(out, "grid_e002.png"))
    assert open(os.path.join(out, "loss.csv")).read().count("\n") == 18  # header + one row a step
    # sample-only: the model comes from the checkpoint, DDPM ancestral with σ² = β_t
    assert run_main(du, ["--sample-only", "--ckpt", os.path.join(out, "ckpt.pt"), "--out-dir", out, "--device",
                         "cpu", "--num-samples", "7", "--sampler", "ddpm", "--var", "beta"]) == 0
    assert os.path.isfile(os.path.join(out, "grid_sample.png"))
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (7, 1, 28, 28) and s["x"].dtype == np.float32 and 0 <= s["x"].min() <= s["x"].max() <= 1
    assert "y" not in s.files and str(s["sampler"]) == "ddpm"


def test_cli_cifar_conditional(fake_cifar, tmp_path):
    out = str(tmp_path / "run")
    assert run_main(du, TINY + ["--dataset", "cifar10", "--data-dir", fake_cifar, "--out-dir", out, "--cond", "--attn-res",
                                "8", "--max-steps", "2", "--num-samples", "5", "--cfg-scales", "0", "3"]) == 0
    for f in ["grid_e001_cfg0.png", "grid_e001_cfg3.png", "denoise_e001.gif", "ckpt.pt",
              "loss.csv", "loss.png", "samples.npz"]:
        assert os.path.isfile(os.path.join(out, f)), f
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (5, 3, 32, 32) and list(s["y"]) == [0, 1, 2, 3, 4] and float(s["cfg_scale"]) == 0
    from PIL import Image
    assert Image.open(os.path.join(out, "grid_e001_cfg3.png")).mode == "RGB"


def test_resume_is_bit_identical(fake_cifar, tmp_path):
    """Flips, dropout, label dropout, t and ε all come from saved RNG state: 5 + 10 steps == 15 steps."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = TINY + ["--dataset", "cifar10", "--data-dir", fake_cifar, "--cond", "--epochs", "2", "--sample-steps",
                   "1", "--cfg-scales", "1"]  # 200 / 16 = 12 steps an epoch
    assert run_main(du, base + ["--out-dir", a, "--max-steps", "15"]) == 0
    assert run_main(du, base + ["--out-dir", b, "--max-steps", "5"]) == 0
    assert run_main(du, base + ["--out-dir", b, "--max-steps", "15", "--resume", f"{b}/ckpt.pt"]) == 0
    wa, wb = torch.load(f"{a}/ckpt.pt", weights_only=False), torch.load(f"{b}/ckpt.pt", weights_only=False)
    assert wa["step"] == wb["step"] == 15
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
        assert torch.equal(wa["ema"][k], wb["ema"][k]), k


@pytest.mark.parametrize("extra, words", [
    (["--attn-res", "5"], "not a resolution of this UNet (28, 14, 7)"),
    (["--channel-mults", "1", "2", "2", "2", "2", "2"], "below 2x2"),
    (["--channel-mults", "1", "0"], "--channel-mults must be"),
    (["--base-channels", "6"], "multiple of 4"),
    (["--var", "sigma"], "unknown --var"),
    (["--sampler", "euler"], "unknown --sampler"),
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--dropout", "1"], "--dropout"),
    (["--sample-steps", "50"], "above --timesteps"),
    (["--sample-only"], "needs --ckpt"),
    (["--sample-only", "--ckpt", "OTHER"], "written by dit_ddpm.py"),
])
def test_bad_input_exit_2(extra, words, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save({"script": "dit_ddpm", "model": {}, "args": {}}, other)
    out = tmp_path / "run"
    extra = [str(other) if e == "OTHER" else e for e in extra]
    assert run_main(du, TINY + ["--out-dir", str(out)] + extra) == 2
    assert words in capsys.readouterr().out
    assert not out.exists()
