"""Tests for dit_flow.py: behaviour and numbers, CPU only, offline (fake MNIST comes from conftest.py)."""
import copy
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import dit_flow
from conftest import run_main

TINY = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--sample-steps", "2",
        "--batch-size", "64", "--log-every", "1", "--device", "cpu"]


def tiny_dit(channels=4, size=32, classes=4):
    torch.manual_seed(0)
    return dit_flow.DiT(size, channels, patch=4, dim=32, depth=2, heads=4, num_classes=classes)


def randomise(model):
    """Give the zero-initialised layers random weights so outputs depend on every input."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


# ----------------------------------------------------------------------------- model
def test_shapes_and_zero_init():
    for channels, size, classes in [(4, 32, 4), (1, 28, 10)]:
        m = tiny_dit(channels, size, classes)
        x, t, y = torch.randn(3, channels, size, size), torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 1, classes])
        out = m(x, t, y)
        assert out.shape == (3, channels, size, size)
        assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained network outputs exactly 0
        assert randomise(m)(x, t, y).abs().sum() > 0


def test_time_is_scaled_by_1000_before_the_embedding(monkeypatch):
    seen = []
    real = dit_flow.timestep_embedding
    monkeypatch.setattr(dit_flow, "timestep_embedding", lambda t, dim: seen.append(t) or real(t, dim))
    tiny_dit()(torch.randn(2, 4, 32, 32), torch.tensor([0.25, 0.5]), torch.tensor([0, 1]))
    assert torch.allclose(seen[0], torch.tensor([250.0, 500.0]))


def test_cfg_scales():
    m = randomise(tiny_dit())
    x, t, y = torch.randn(4, 4, 32, 32), torch.tensor([0.0, 0.3, 0.7, 1.0]), torch.tensor([0, 1, 2, 3])
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, 4))
    assert not torch.allclose(cond, null, atol=1e-4)
    assert torch.allclose(dit_flow.guided_v(m, x, t, y, 1.0), cond, atol=1e-5)  # s = 1: plain conditional
    assert torch.allclose(dit_flow.guided_v(m, x, t, y, 0.0), null, atol=1e-5)  # s = 0: unconditional
    assert torch.allclose(dit_flow.guided_v(m, x, t, y, 3.0), null + 3 * (cond - null), atol=1e-4)


# ----------------------------------------------------------------------------- data
def reference_raw_templates():
    """The issue's formulas, written independently with numpy: (class, channel, 32, 32) before normalising."""
    u = np.linspace(-np.pi, np.pi, 32)
    x, y = u[None, :], u[:, None]  # x varies along a row (columns), y down a column (rows)
    r = np.sqrt(x ** 2 + y ** 2)
    pats = [np.sin(2 * x) + 0 * y, np.sin(4 * y) + 0 * x, np.sign(np.sin(3 * x) * np.sin(3 * y)),
            np.exp(-r ** 2 / 2) * np.cos(4 * r)]
    return np.stack([[p + 0.1 * i for i in range(4)] for p in pats])


def test_templates_match_the_formulas():
    raw = reference_raw_templates()
    ref = raw / np.abs(raw).max(axis=(1, 2, 3), keepdims=True)
    assert dit_flow.TEMPLATES.shape == (4, 4, 32, 32)
    assert np.allclose(dit_flow.TEMPLATES.numpy(), ref, atol=1e-6)
    assert torch.equal(dit_flow.TEMPLATES[0, :, 0], dit_flow.TEMPLATES[0, :, 17])  # stripes along x: rows equal
    assert torch.equal(dit_flow.TEMPLATES[1, :, :, 0], dit_flow.TEMPLATES[1, :, :, 9])  # along y: columns equal


def test_dataset_statistics():
    x, y = dit_flow.make_patterns(0)
    assert x.shape == (2000, 4, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.bincount(y).tolist() == [500] * 4  # balanced
    assert torch.allclose(x.abs().amax(dim=(1, 2, 3)), torch.ones(2000))  # each sample: max |x| = 1 exactly
    raw = torch.tensor(reference_raw_templates(), dtype=torch.float32)[y]  # (N, 4, 32, 32)
    m = (raw * raw).sum(dim=(1, 2, 3)) / (x * raw).sum(dim=(1, 2, 3))  # the sample's divisor: x ≈ raw / m
    resid = x * m.view(-1, 1, 1, 1) - raw  # = the added noise if class, offsets and scaling are right
    assert abs(resid.std().item() - 0.05) < 0.002 and abs(resid.mean().item()) < 0.002
    offsets = ((x - x[:, :1]) * m.view(-1, 1, 1, 1)).mean(dim=(0, 2, 3))  # channel i - channel 0, unscaled
    assert torch.allclose(offsets, torch.tensor([0.0, 0.1, 0.2, 0.3]), atol=0.003)
    x2, _ = dit_flow.make_patterns(0)
    assert torch.equal(x, x2) and not torch.equal(x, dit_flow.make_patterns(1)[0])  # deterministic from seed


def test_template_scores():
    y = torch.arange(4)
    assert dit_flow.template_scores(dit_flow.TEMPLATES, y) == (1.0, 0.0)
    x, y = dit_flow.make_patterns(0, n=400)
    match, rms = dit_flow.template_scores(x, y)
    assert match == 1.0 and 0.04 < rms < 0.1  # real data: the noise (σ 0.05 before scaling) and the scaling
    match, _ = dit_flow.template_scores(x, (y + 1) % 4)  # wrong labels never match
    assert match == 0.0


# ----------------------------------------------------------------------------- flow matching
def test_straight_path_and_t_sampling():
    torch.manual_seed(0)
    x0, x1 = torch.randn(2, 3, 4, 5, 5).unbind(0)
    t = torch.tensor([0.0, 0.4, 1.0])
    xt, v = dit_flow.straight_path(x0, x1, t)
    assert torch.equal(xt[0], x0[0]) and torch.allclose(xt[2], x1[2])  # noise at t = 0, data at t = 1
    h = 1e-3
    fd = (dit_flow.straight_path(x0, x1, t + h)[0] - dit_flow.straight_path(x0, x1, t - h)[0]) / (2 * h)
    assert torch.allclose(fd, v, atol=1e-3) and torch.allclose(v, x1 - x0)  # v = dx_t/dt
    u = dit_flow.sample_t(100000, "uniform", "cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = dit_flow.sample_t(100000, "logit-normal", "cpu")
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02  # logit(t) ~ N(0, 1)


def integration_error(v, exact, steps, method):
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return (dit_flow.integrate(v, x0, steps, method)[0] - exact(x0)).abs().max().item()


@pytest.mark.parametrize("v, exact", [
    (lambda x, t: -1.5 * x, lambda x0: x0 * math.exp(-1.5)),  # dx/dt = a x: x(1) = x0 e^a
    (lambda x, t: 2 * t * x, lambda x0: x0 * math.e),  # dx/dt = 2t x: x(t) = x0 e^(t²)
])
def test_euler_is_first_order_heun_second(v, exact):
    for method, order in (("euler", 1), ("heun", 2)):
        errs = [integration_error(v, exact, n, method) for n in (16, 32, 64, 128)]
        orders = [math.log2(a / b) for a, b in zip(errs, errs[1:])]  # error ~ dt^order: halving dt divides by 2^order
        assert all(abs(p - order) < 0.15 for p in orders), (method, orders)
    for n in (2, 5, 10, 20):
        assert integration_error(v, exact, n, "heun") < integration_error(v, exact, n, "euler")


def test_integrate_exactness_calls_and_frames():
    v = lambda x, t: 3 - 2 * t + 0 * x  # noqa: E731  dx/dt = 3 - 2t: x(1) = x0 + 2
    x0 = torch.zeros(1, dtype=torch.float64)
    for n in (1, 3, 10):  # Euler: left sums, error dt; Heun: trapezoids are exact but its last (Euler) step: dt²
        assert abs(dit_flow.integrate(v, x0, n, "euler")[0].item() - (2 + 1 / n)) < 1e-12
        assert abs(dit_flow.integrate(v, x0, n, "heun")[0].item() - (2 + 1 / n ** 2)) < 1e-12
    calls = []
    counting = lambda x, t: calls.append(t) or x  # noqa: E731
    dit_flow.integrate(counting, x0, 5, "euler")
    assert calls == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    calls.clear()
    dit_flow.integrate(counting, x0, 5, "heun")
    assert calls == pytest.approx([0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8])  # 2 calls a step; never at t = 1
    x, snaps = dit_flow.integrate(lambda x, t: x, torch.ones(1), 20, "euler", frames=5)
    assert len(snaps) == 6 and snaps[0].item() == 1 and torch.equal(snaps[-1], x)


def test_sample_starts_from_noise_and_follows_the_guided_velocity():
    m, y = randomise(tiny_dit()), torch.tensor([0, 3])
    x, _ = dit_flow.sample(m, y, 2.0, "euler", 1, gen=torch.Generator().manual_seed(5))
    x0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    ref = x0 + dit_flow.guided_v(m, x0, torch.zeros(2), y, 2.0)  # one Euler step from t = 0 to 1
    assert torch.allclose(x, ref.clamp(-1, 1), atol=1e-5)


def test_tiny_dit_overfits_16_patterns():
    x1, y = dit_flow.make_patterns(0, n=16)
    torch.manual_seed(0)  # 64 wide: a token must carry its 4x4x4 patch values (32 is too narrow to learn -x_t)
    m = dit_flow.DiT(32, 4, patch=4, dim=64, depth=1, heads=4, num_classes=4)
    ema = copy.deepcopy(m).requires_grad_(False)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    a = SimpleNamespace(label_dropout=0.0, t_sampling="uniform", amp=False, lr=3e-3, warmup_steps=0, grad_clip=1.0,
                        ema_decay=0.999)
    losses = [dit_flow.train_step(a, m, m, ema, opt, x1, y, s, 10**9).item() for s in range(100)]
    assert abs(losses[0] - (1 + x1.pow(2).mean().item())) < 0.05  # zero output: E|x1 - x0|² = 1 + E x1²
    assert np.mean(losses[-20:]) < 0.5 * losses[0]


# ----------------------------------------------------------------------------- CLI
def test_cli_patterns_train_resume_sample(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = TINY + ["--out-dir", out, "--epochs", "2", "--cfg-scales", "0", "3"]
    assert run_main(dit_flow, args + ["--max-steps", "3"]) == 0
    for f in ["grid_e001_cfg0.png", "grid_e001_cfg3.png", "denoise_e001.gif", "compare_e001.png", "ckpt.pt",
              "loss.csv", "loss.png", "metrics.csv"]:
        assert os.path.isfile(os.path.join(out, f)), f
    printed = capsys.readouterr().out
    assert "e001 cfg 3: class match" in printed and "real data's RMS to template is 0.0619" in printed
    # compare: 2 rows (real, generated) x 4 classes; each cell 4 channels of 32 px side by side, 1 px apart
    assert Image.open(os.path.join(out, "compare_e001.png")).size == (2 * (4 * (4 * 33 - 1 + 2) + 2), 2 * (2 * 34 + 2))
    # resume to the end of epoch 1 (2000 // 64 = 31 steps) and into epoch 2
    assert run_main(dit_flow, args + ["--max-steps", "33", "--resume", os.path.join(out, "ckpt.pt")]) == 0
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)
    assert ck["step"] == 33 and ck["args"]["dataset"] == "patterns"
    assert [(r["step"], r["what"]) for r in ck["metrics"]] == [(3, "e001 cfg 0"), (3, "e001 cfg 3"),  # kept on resume
                                                               (31, "e001 cfg 0"), (31, "e001 cfg 3"),
                                                               (33, "e002 cfg 0"), (33, "e002 cfg 3")]
    assert open(os.path.join(out, "metrics.csv")).read().count("\n") == 7
    assert open(os.path.join(out, "loss.csv")).read().count("\n") == 34
    # sample-only: the model comes from the checkpoint; Heun; metrics for the grid and for samples.npz
    assert run_main(dit_flow, ["--sample-only", "--ckpt", os.path.join(out, "ckpt.pt"), "--out-dir", out,
                               "--num-samples", "12", "--cfg-scales", "2", "--sampler", "heun", "--sample-steps", "3",
                               "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "sample cfg 2: class match" in printed and "samples.npz: class match" in printed
    assert "heun 3 steps" in printed
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (12, 4, 32, 32) and 0 <= s["x"].min() and s["x"].max() <= 1
    assert list(s["y"]) == [i % 4 for i in range(12)] and str(s["sampler"]) == "heun"
    for f in ["grid_sample_cfg2.png", "denoise_sample.gif", "compare_sample.png", "metrics_sample.csv"]:
        assert os.path.isfile(os.path.join(out, f)), f


def test_cli_fake_mnist(fake_mnist, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(dit_flow, TINY + ["--dataset", "mnist", "--data-dir", fake_mnist, "--out-dir", out,
                                      "--max-steps", "5", "--num-samples", "10", "--t-sampling", "logit-normal"]) == 0
    assert "class match" not in capsys.readouterr().out  # the template scores are for the synthetic set only
    for f in ["grid_e002_cfg0.png", "grid_e002_cfg3.png", "compare_e001.png", "compare_e002.png", "samples.npz"]:
        assert os.path.isfile(os.path.join(out, f)), f  # 256 // 64 = 4 steps an epoch
    assert Image.open(os.path.join(out, "compare_e001.png")).size == (2 * (10 * 30 + 2), 2 * (2 * 30 + 2))
    s = np.load(os.path.join(out, "samples.npz"))
    assert s["x"].shape == (10, 1, 28, 28) and list(s["y"]) == list(range(10))


def test_resume_is_bit_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    base = TINY + ["--epochs", "2", "--sample-steps", "1", "--cfg-scales", "1"]
    assert run_main(dit_flow, base + ["--out-dir", a, "--max-steps", "34"]) == 0
    assert run_main(dit_flow, base + ["--out-dir", b, "--max-steps", "7"]) == 0
    assert run_main(dit_flow, base + ["--out-dir", b, "--max-steps", "34", "--resume", f"{b}/ckpt.pt"]) == 0
    wa, wb = torch.load(f"{a}/ckpt.pt", weights_only=False), torch.load(f"{b}/ckpt.pt", weights_only=False)
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
        assert torch.equal(wa["ema"][k], wb["ema"][k]), k
    assert wa["loss_log"] == wb["loss_log"]


@pytest.mark.parametrize("extra, words", [
    (["--patch-size", "3"], "does not divide the image size 32"),
    (["--dataset", "mnist", "--patch-size", "8"], "does not divide the image size 28"),
    (["--sampler", "ddim"], "unknown --sampler"),
    (["--t-sampling", "beta"], "unknown --t-sampling"),
    (["--sample-steps", "0"], "--sample-steps must be >= 1"),
    (["--dataset", "cifar10"], "unknown --dataset"),
    (["--cfg-scales", "-1"], "--cfg-scales"),
    (["--sample-only"], "needs --ckpt"),
    (["--sample-only", "--ckpt", "nope.pt"], "does not exist"),
    (["--sample-only", "--ckpt", "DDPM"], "written by dit_ddpm.py"),
])
def test_bad_input_exit_2(extra, words, tmp_path, capsys):
    torch.save({"script": "dit_ddpm", "model": {}, "args": {}}, tmp_path / "ddpm.pt")
    extra = [str(tmp_path / "ddpm.pt") if e == "DDPM" else e for e in extra]
    out = tmp_path / "run"
    assert run_main(dit_flow, TINY + ["--out-dir", str(out)] + extra) == 2
    assert words in capsys.readouterr().out
    assert not out.exists()
