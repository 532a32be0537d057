"""The test suite: behaviour and numbers, CPU only, offline (fake datasets come from conftest.py)."""
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import dit_ddpm
from conftest import run_main

TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--timesteps", "20", "--sample-steps", "4",
        "--batch-size", "16", "--log-every", "1", "--device", "cpu"]


# ----------------------------------------------------------------------------- common.py
def test_timestep_embedding_values():
    emb = common.timestep_embedding(torch.tensor([0.0, 5.0]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    freqs = 10000 ** (-torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]), atol=1e-6)


def test_pos_embed_2d_rows_and_columns():
    pe = common.pos_embed_2d(16, 3)  # (9, 16): first half depends on the row only, second on the column only
    assert pe.shape == (9, 16)
    assert torch.equal(pe[0, :8], pe[2, :8]) and not torch.equal(pe[0, :8], pe[3, :8])
    assert torch.equal(pe[0, 8:], pe[3, 8:]) and not torch.equal(pe[0, 8:], pe[1, 8:])


def test_grid_and_gif(tmp_path):
    from PIL import Image
    x = torch.rand(20, 1, 28, 28)
    common.save_grid(x, tmp_path / "g.png", nrow=10, scale=1)
    assert Image.open(tmp_path / "g.png").size == (10 * 30 + 2, 2 * 30 + 2)
    common.save_gif([x, x * 0.5], tmp_path / "a.gif", nrow=10)
    assert Image.open(tmp_path / "a.gif").n_frames == 2


def test_device_errors():
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="CUDA is not available"):
            common.pick_device("cuda:3")
    with pytest.raises(common.UsageError, match="unknown device"):
        common.pick_device("gpu")


# ----------------------------------------------------------------------------- dit_ddpm.py: model
def tiny_dit(**kw):
    torch.manual_seed(0)
    return dit_ddpm.DiT(28, 1, patch=4, dim=32, depth=2, heads=4, **kw)


def randomise(model):
    """Give the zero-initialised layers random weights so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_dit_shapes_and_zero_init():
    m = tiny_dit()
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 399]), torch.tensor([1, 2, 10])
    out = m(x, t, y)
    assert out.shape == (3, 1, 28, 28)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained network outputs exactly 0
    assert randomise(m)(x, t, y).abs().sum() > 0


def test_unpatchify_inverts_patchify():
    m = tiny_dit()
    x = torch.randn(2, 1, 28, 28)
    tokens = x.view(2, 1, 7, 4, 7, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 49, 16)  # patch-major, (N, T, p*p*C)
    assert torch.equal(m.unpatchify(tokens), x)


def test_attention_matches_explicit_formula():
    torch.manual_seed(0)
    attn = dit_ddpm.Attention(32, heads=4)
    x = torch.randn(2, 49, 32)
    q, k, v = attn.qkv(x).view(2, 49, 3, 4, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)  # softmax(QKᵀ/√d)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 49, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------- dit_ddpm.py: diffusion
def test_schedules_at_both_ends():
    lin, cos = dit_ddpm.Diffusion(400, "linear"), dit_ddpm.Diffusion(1000, "cosine")
    assert torch.isclose(lin.abar[0], torch.tensor(1 - 1e-4)) and 0.017 < lin.abar[-1] < 0.018  # exp(-Σβ) ≈ 0.0175
    assert 0.9999 < cos.abar[0] < 1 and cos.abar[-1] < 1e-6  # cosine: ᾱ_T ≈ 0, pure noise at t = T
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abs(cos.abar[499].item() - f(0.5) / f(0)) < 1e-5  # ᾱ at t = T/2 from the closed form
    for d in (lin, cos):
        assert (d.abar[1:] < d.abar[:-1]).all()


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_round_trip_is_exact(prediction):
    """The training target built from (x0, ε) converts back to the same (x0, ε) at every t."""
    d = dit_ddpm.Diffusion(400, "cosine", prediction)
    torch.manual_seed(0)
    x0, eps = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    for t in (0, 100, 399):
        a = d.abar[t]
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        out = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}[prediction]
        x0_hat, eps_hat = d.denoise(out, x, t)
        assert torch.allclose(x0_hat, x0, atol=2e-3 if t == 399 and prediction == "eps" else 1e-5)
        assert torch.allclose(eps_hat, eps, atol=1e-3)


def test_min_snr_weights():
    a = torch.tensor([0.5, 10 / 11, 0.2])  # SNR = 1, 10, 0.25
    expect = {"eps": [1.0, 0.5, 1.0], "v": [0.5, 5 / 11, 0.2], "x0": [1.0, 5.0, 0.25]}  # min(SNR, 5) / (SNR, SNR+1, 1)
    for prediction, w in expect.items():
        assert torch.allclose(dit_ddpm.Diffusion(10, prediction=prediction, snr_gamma=5).weight(a), torch.tensor(w))
        assert torch.equal(dit_ddpm.Diffusion(10, prediction=prediction).weight(a), torch.ones(3))


class Oracle(torch.nn.Module):
    """The exact denoiser of a few points: E[x0 | x_t, y] is the softmax-weighted mean of the class's points."""

    def __init__(self, d, points, labels):
        super().__init__()
        self.d, self.points, self.labels, self.num_classes = d, points, labels, int(labels.max()) + 1
        self.channels, self.grid, self.patch = points.shape[1], 1, points.shape[2]

    def forward(self, x, t, y):
        a = self.d.abar[t].view(-1, 1)
        xf, p = x.flatten(1), self.points.flatten(1)
        logits = -((xf[:, None] - a.sqrt()[:, None] * p[None]) ** 2).sum(-1) / (2 * (1 - a))  # log q(x_t | p)
        logits = logits.masked_fill((self.labels[None] != y[:, None]) & (y[:, None] != self.num_classes), -math.inf)
        x0 = (logits.softmax(-1) @ p).view_as(x)
        eps = (x - a.sqrt().view(-1, 1, 1, 1) * x0) / (1 - a).sqrt().view(-1, 1, 1, 1)
        return {"eps": eps, "v": a.sqrt().view(-1, 1, 1, 1) * eps - (1 - a).sqrt().view(-1, 1, 1, 1) * x0,
                "x0": x0}[self.d.prediction]


POINTS = torch.tensor([[-0.8, 0.6, 0.2, -0.4], [0.5, -0.5, 0.9, 0.1], [0.5, -0.5, 0.9, 0.1], [0.5, -0.5, 0.9, 0.1]])
LABELS = torch.tensor([0, 1, 1, 1])  # class 1 holds 3 of the 4 points


@pytest.mark.parametrize("schedule,prediction,sampler,steps", [
    ("linear", "eps", "ddpm", 0), ("linear", "eps", "ddim", 20), ("cosine", "v", "ddpm", 0),
    ("cosine", "v", "ddim", 20), ("cosine", "v", "dpm++", 10), ("cosine", "v", "dpm++", 20),
    ("cosine", "x0", "dpm++", 10), ("linear", "eps", "dpm++", 20)])
def test_samplers_land_on_the_points_with_their_frequencies(schedule, prediction, sampler, steps):
    d = dit_ddpm.Diffusion(1000, schedule, prediction, num_classes=2)  # linear over 1000 steps: ᾱ_T = 4e-5
    m = Oracle(d, POINTS.view(4, 1, 2, 2), LABELS)
    gen = torch.Generator().manual_seed(0)
    n = 1000
    x, _ = d.sample(m, torch.zeros(n, dtype=torch.long), 0.0, sampler, steps, gen=gen)  # unconditional
    dist = torch.cdist(x.flatten(1), POINTS)  # (n, 4)
    assert dist.min(1).values.max() < 0.02  # every sample lands on a point
    share = (dist.argmin(1) >= 1).float().mean()  # the duplicated point: 3/4 of the mass
    assert abs(share - 0.75) < 0.05
    x, _ = d.sample(m, torch.zeros(200, dtype=torch.long), 1.0, sampler, steps, gen=gen)  # class 0 only
    assert torch.cdist(x.flatten(1), POINTS[:1]).max() < 0.02


def test_dpmpp_is_second_order_on_a_gaussian():
    """Data N(0, s²): E[x0|x_t] = √ᾱ s² / (ᾱ s² + 1 - ᾱ) x_t and the ODE keeps x_t / √(ᾱ s² + 1 - ᾱ) fixed."""
    s2 = 0.25

    class Gauss(torch.nn.Module):
        channels, grid, patch, num_classes = 1, 1, 2, 1

        def forward(self, x, t, y):
            a = d.abar[t].view(-1, 1, 1, 1)
            return a.sqrt() * s2 / (a * s2 + 1 - a) * x  # x0-prediction

    d = dit_ddpm.Diffusion(1000, "cosine", "x0", num_classes=1)
    y = torch.zeros(64, dtype=torch.long)
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = x_T * s2 ** 0.5 / (d.abar[-1] * s2 + 1 - d.abar[-1]).sqrt()
    inside = exact.abs() < 0.9  # |x0 estimate| <= |x0| along the path: the [-1, 1] clip never acts here
    err = {(k, n): (d.sample(Gauss(), y, 1.0, k, n, gen=torch.Generator().manual_seed(0))[0] - exact)[inside].abs().max()
           for k in ("dpm++", "ddim") for n in (5, 10, 20)}
    assert err["dpm++", 5] / err["dpm++", 10] > 3.5 and err["dpm++", 10] / err["dpm++", 20] > 3.5  # >= 4: order 2
    assert err["ddim", 5] / err["ddim", 10] < 2.2 and err["ddim", 10] / err["ddim", 20] < 2.2  # ≈ 2: order 1
    assert err["dpm++", 20] < err["ddim", 20] / 10


def test_cfg_scales():
    m, d = randomise(tiny_dit()), dit_ddpm.Diffusion(400)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 9])
    t = torch.full((4,), 50)
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, 10))
    assert not torch.allclose(cond, null, atol=1e-4)
    assert torch.allclose(d.guided(m, x, 50, y, 1.0), cond, atol=1e-5)  # s = 1: plain conditional
    assert torch.allclose(d.guided(m, x, 50, y, 0.0), null, atol=1e-5)  # s = 0: unconditional
    assert torch.allclose(d.guided(m, x, 50, y, 3.0), null + 3 * (cond - null), atol=1e-4)


def test_cfg_scale_1_sampling_equals_the_conditional_model():
    d = dit_ddpm.Diffusion(100, "cosine", "v")
    m = randomise(tiny_dit())
    cond = lambda x, t, y: m(x, t, y.clamp(max=9))  # noqa: E731  the null half also sees the label
    cond.channels, cond.grid, cond.patch, cond.num_classes = 1, 7, 4, 10
    y = torch.tensor([0, 3])
    for sampler in ("dpm++", "ddim"):
        a, _ = d.sample(m, y, 1.0, sampler, 8, gen=torch.Generator().manual_seed(5))
        b, _ = d.sample(cond, y, 1.0, sampler, 8, gen=torch.Generator().manual_seed(5))
        assert torch.allclose(a, b, atol=1e-5)


def test_tiny_dit_overfits_64_images():
    torch.manual_seed(0)
    y = torch.arange(64) % 10
    x0 = -torch.ones(64, 1, 28, 28)  # one bar per class, at a class-dependent height
    for i, c in enumerate(y):
        x0[i, 0, 2 + 2 * c: 5 + 2 * c, 4:24] = 1
    m, d = tiny_dit(), dit_ddpm.Diffusion(100, label_dropout=0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        loss = d.loss(m, x0, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - 1.0) < 0.05  # zero output: the loss starts at E[ε²] = 1
    assert np.mean(losses[-20:]) < 0.5 * losses[0]


def test_ema_update_with_warmup():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    ema_before = [p.clone() for p in a.parameters()]
    common.ema_update(a, b, step=0, decay=0.9999)  # decay at step 0 is 1/10
    for e0, e, m in zip(ema_before, a.parameters(), b.parameters()):
        assert torch.allclose(e, 0.1 * e0 + 0.9 * m)


# ----------------------------------------------------------------------------- dit_ddpm.py: CLI
def test_cli_train_resume_sample(fake_mnist, tmp_path):
    out = str(tmp_path / "run")
    args = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--epochs", "2"]
    assert run_main(dit_ddpm, args + ["--max-steps", "3"]) == 0
    for f in ["grid_e001_cfg0.png", "grid_e001_cfg1.png", "grid_e001_cfg3.png", "denoise_e001.gif", "ckpt.pt",
              "loss.csv", "loss.png"]:
        assert os.path.isfile(os.path.join(out, f)), f
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert {"model", "ema", "opt", "step", "epoch", "args", "rng"} <= set(ck) and ck["step"] == 3
    # resume runs on to the end of epoch 1 (256 / 16 = 16 steps) and into epoch 2
    assert run_main(dit_ddpm, args + ["--max-steps", "20", "--resume", os.path.join(out, "ckpt.pt")]) == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 20
    assert os.path.isfile(os.path.join(out, "grid_e002_cfg3.png"))
    assert open(os.path.join(out, "loss.csv")).read().count("\n") == 21  # header + one row a step
    # sample-only: model sizes come from the checkpoint
    assert run_main(dit_ddpm, ["--sample-only", "--ckpt", os.path.join(out, "ckpt.pt"), "--out-dir", out,
                               "--num-samples", "12", "--cfg-scales", "2", "--sample-steps", "3",
                               "--device", "cpu"]) == 0
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (12, 1, 28, 28) and 0 <= s["x"].min() and s["x"].max() <= 1
    assert list(s["y"]) == [i % 10 for i in range(12)]


def test_resume_is_bit_identical(fake_mnist, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = TINY + ["--data-dir", fake_mnist, "--epochs", "2", "--sample-steps", "1", "--cfg-scales", "1"]
    assert run_main(dit_ddpm, base + ["--out-dir", a, "--max-steps", "20"]) == 0
    assert run_main(dit_ddpm, base + ["--out-dir", b, "--max-steps", "7"]) == 0
    assert run_main(dit_ddpm, base + ["--out-dir", b, "--max-steps", "20", "--resume", f"{b}/ckpt.pt"]) == 0
    wa, wb = torch.load(f"{a}/ckpt.pt", weights_only=False), torch.load(f"{b}/ckpt.pt", weights_only=False)
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
        assert torch.equal(wa["ema"][k], wb["ema"][k]), k


@pytest.mark.parametrize("extra, words", [
    (["--hidden-size", "30", "--num-heads", "4"], "not divisible"),
    (["--patch-size", "5"], "does not divide"),
    (["--sample-steps", "50"], "above --timesteps"),
    (["--sampler", "euler"], "argument --sampler: invalid choice"),
    (["--dataset", "imagenet"], "unknown --dataset"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--lr", "-1"], "--lr must be"),
    (["--cfg-scales", "nan"], "--cfg-scales"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--timesteps", "0"], "--timesteps must be >= 1"),
    (["--depth", "0"], "--depth must be >= 1"),
    (["--num-samples", "-1"], "--num-samples must be >= 0"),
    (["--max-steps", "-5"], "--max-steps must be >= 0"),
    (["--label-dropout", "1.5"], "--label-dropout"),
    (["--sample-only"], "needs --ckpt"),
    (["--sample-only", "--ckpt", "nope.pt"], "does not exist"),
])
def test_bad_input_exit_2(extra, words, tmp_path, capsys):
    """Each out-of-range or inconsistent flag: one line, exit code 2, nothing written."""
    out = tmp_path / "run"
    assert run_main(dit_ddpm, TINY + ["--out-dir", str(out)] + extra) == 2
    assert words in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_missing_cuda_device_exit_2(device, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main(dit_ddpm, TINY[:-2] + ["--device", device, "--out-dir", str(out)]) == 2
    assert "CUDA is not available" in capsys.readouterr().out and not out.exists()


def test_missing_data_offline_is_one_line(tmp_path, capsys, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    empty = tmp_path / "empty"
    assert run_main(dit_ddpm, TINY + ["--data-dir", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    msg = capsys.readouterr().out
    assert "MNIST/raw" in msg and "train-images-idx3-ubyte" in msg and "network" in msg


def test_out_dir_of_another_run_is_not_mixed(fake_mnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    args = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--max-steps", "2", "--sample-steps", "1"]
    assert run_main(dit_ddpm, args) == 0
    before = os.path.getmtime(os.path.join(out, "ckpt.pt"))
    assert run_main(dit_ddpm, args) == 2  # a second fresh run into the same folder is refused ...
    assert "already holds a run" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "ckpt.pt")) == before
    os.rename(os.path.join(out, "grid_e001_cfg3.png"), os.path.join(out, "grid_e009_cfg3.png"))
    assert run_main(dit_ddpm, args + ["--overwrite"]) == 0  # ... and --overwrite clears the old outputs first
    assert not os.path.exists(os.path.join(out, "grid_e009_cfg3.png"))


def test_torchrun_two_ranks_identical_weights(fake_mnist, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dit_ddpm.py",
           *TINY, "--data-dir", fake_mnist, "--out-dir", str(out), "--max-steps", "3", "--sample-steps", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=os.path.dirname(__file__),
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    sums = sorted(line for line in r.stdout.splitlines() if "weights checksum" in line)
    assert len(sums) == 2 and sums[0].split()[-1] == sums[1].split()[-1], sums
    assert r.stdout.count("done: 3 steps") == 1  # only rank 0 reports and writes
    assert sorted(os.listdir(out)) == sorted(["ckpt.pt", "denoise_e001.gif", "grid_e001_cfg0.png", "grid_e001_cfg1.png",
                                              "grid_e001_cfg3.png", "loss.csv", "loss.png"])


# ----------------------------------------------------------------------------- faults (issue 6)
@pytest.fixture(scope="module")
def trained_ckpt(fake_mnist, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck") / "run")
    assert run_main(dit_ddpm, TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--max-steps", "2",
                                      "--sample-steps", "1"]) == 0
    return os.path.join(out, "ckpt.pt")


@pytest.mark.parametrize("make, words", [
    (lambda p, ck: open(p, "wb").write(open(ck, "rb").read()[:5000]), "truncated or corrupt"),
    (lambda p, ck: open(p, "wb").write(b"not a checkpoint"), "truncated or corrupt"),
    (lambda p, ck: torch.save({**torch.load(ck, weights_only=False), "script": "dit_flow"}, p), "written by dit_flow.py"),
    (lambda p, ck: torch.save({"weights": 1}, p), "not a checkpoint of this repo"),
])
def test_bad_checkpoint_exit_2(make, words, trained_ckpt, tmp_path, capsys):
    bad = str(tmp_path / "bad.pt")
    make(bad, trained_ckpt)
    for flag in ("--ckpt", "--resume"):
        out = tmp_path / f"o{flag}"
        extra = ["--sample-only"] if flag == "--ckpt" else []
        assert run_main(dit_ddpm, [flag, bad, "--out-dir", str(out), "--device", "cpu"] + extra) == 2
        assert words in capsys.readouterr().out
        assert not out.exists()


def test_checkpoint_of_other_model_size_exit_2(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--sample-only", "--ckpt", trained_ckpt, "--out-dir", str(out), "--device", "cpu", "--hidden-size", "64"]
    assert run_main(dit_ddpm, argv) == 2
    assert "has --hidden-size 32, but this command asks for 64" in capsys.readouterr().out
    ck = torch.load(trained_ckpt, weights_only=False)
    ck["model"]["final.linear.weight"] = torch.zeros(3, 3)  # weights that do not fit the recorded sizes
    torch.save(ck, tmp_path / "odd.pt")
    argv = ["--sample-only", "--ckpt", str(tmp_path / "odd.pt"), "--out-dir", str(out), "--sample-steps", "4"]
    assert run_main(dit_ddpm, argv) == 2
    assert "does not fit this model" in capsys.readouterr().out and not out.exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fake_mnist, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_step = dit_ddpm.train_step

    def step_then_nan(a, net, model, ema, opt, diff, x0, y, step, total):
        loss = real_step(a, net, model, ema, opt, diff, x0, y, step, total)
        return loss * float("nan") if step >= 17 else loss
    monkeypatch.setattr(dit_ddpm, "train_step", step_then_nan)
    argv = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--max-steps", "30", "--sample-steps", "1"]
    assert run_main(dit_ddpm, argv) == 1
    assert "loss is nan at step 18" in capsys.readouterr().err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 16  # end of epoch 1


KILL_MID_SAVE = """
import os, signal, sys, torch, dit_ddpm
real, n = torch.save, [0]
def dying_save(obj, f):
    n[0] += 1
    if n[0] == 2:  # the second checkpoint: write part of it, then die as if killed
        real(obj, f)
        open(f, "r+b").truncate(3000)
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
torch.save = dying_save
dit_ddpm.main(sys.argv[1:])
"""


def test_kill_mid_save_keeps_previous_checkpoint(fake_mnist, tmp_path):
    import subprocess
    import sys
    out = str(tmp_path / "run")
    argv = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--epochs", "3", "--sample-steps", "1"]
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, *argv], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(__file__))
    assert r.returncode == -9
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == 16  # the first epoch's, intact
    assert [f for f in os.listdir(out) if ".tmp" in f]  # the half-written temp file is all that was lost
    assert run_main(dit_ddpm, argv + ["--resume", os.path.join(out, "ckpt.pt"), "--max-steps", "18"]) == 0
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_sigterm_saves_and_prints_resume_command(fake_mnist, tmp_path):
    import signal
    import subprocess
    import sys
    out = str(tmp_path / "run")
    argv = TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--epochs", "500", "--sample-steps", "1"]
    p = subprocess.Popen([sys.executable, "dit_ddpm.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=os.path.dirname(__file__))
    for line in p.stdout:  # wait until training is under way
        if line.startswith("epoch 1/500 step 3/"):
            break
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "interrupted at step" in rest and f"--resume {out}/ckpt.pt" in rest
    step = int(rest.split("interrupted at step ")[1].split(";")[0])
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"] == step >= 3


# ----------------------------------------------------------------------------- speed flags (issue 7)
def test_compile_runs_two_steps_and_saves_plain_weights(fake_mnist, tmp_path):
    import shutil
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++/clang++), none on PATH")
    out = str(tmp_path / "run")
    assert run_main(dit_ddpm, TINY + ["--data-dir", fake_mnist, "--out-dir", out, "--max-steps", "2", "--compile",
                                      "--sample-steps", "1", "--cfg-scales", "1"]) == 0
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["step"] == 2 and not any(k.startswith("_orig_mod") for k in ck["model"])


def test_benchmark_mode_prints_throughput_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    assert run_main(dit_ddpm, TINY + ["--benchmark", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    assert "img/s" in text and "GFLOP/img" in text and "100 samples" in text and not out.exists()
    gflop = float(re.search(r"([-+.\deE]+) GFLOP/img", text).group(1))  # printed as 0.0031 or 3.1e-05
    assert 0.001 < gflop < 0.1  # a 32-wide, 1-deep DiT on 49 tokens: a few MFLOP a step per image
