"""Unit tests for dit_flow.py: the DiT with its time scaling, the synthetic patterns and the Flow object."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dit_flow
from conftest import randomise, run_main

FLOW = dit_flow.Flow("uniform", "v", cfg_interval=(0, math.inf))  # velocity, guided at every step


def tiny_dit(channels=4, size=32, classes=4):
    torch.manual_seed(0)
    return dit_flow.DiT(size, channels, classes, patch_size=4, hidden_size=32, depth=2, num_heads=4)


# ----------------------------------------------------------------------------- model
def test_shapes_and_zero_init():
    for channels, size, classes in [(4, 32, 4), (1, 28, 10)]:
        m = tiny_dit(channels, size, classes)
        x = torch.randn(3, channels, size, size)
        t = torch.tensor([0.0, 0.5, 1.0])
        y = torch.tensor([0, 1, -1])
        out = m(x, t, y)
        assert out.shape == (3, channels, size, size)
        assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained network outputs exactly 0
        assert randomise(m)(x, t, y).abs().sum() > 0


def test_time_is_scaled_by_1000_before_the_embedding(monkeypatch):
    seen = []
    real = dit_flow.timestep_embedding

    def recording(t, dim):
        seen.append(t)
        return real(t, dim)
    monkeypatch.setattr(dit_flow, "timestep_embedding", recording)
    tiny_dit()(torch.randn(2, 4, 32, 32), torch.tensor([0.25, 0.5]), torch.tensor([0, 1]))
    assert torch.allclose(seen[0], torch.tensor([250.0, 500.0]))


def test_cfg_scales():
    m = randomise(tiny_dit())
    x = torch.randn(4, 4, 32, 32)
    t = torch.full((4,), 0.3)
    y = torch.tensor([0, 1, 2, 3])
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, -1))
    assert not torch.allclose(cond, null, atol=1e-4)
    assert torch.allclose(FLOW.guided(m, x, 0.3, y, 1.0), cond, atol=1e-5)  # s = 1: plain conditional
    assert torch.allclose(FLOW.guided(m, x, 0.3, y, 0.0), null, atol=1e-5)  # s = 0: unconditional
    assert torch.allclose(FLOW.guided(m, x, 0.3, y, 3.0), null + 3 * (cond - null), atol=1e-4)


def test_cfg_interval_guides_only_inside_it():
    m = randomise(tiny_dit())
    flow = dit_flow.Flow("uniform", "v", cfg_interval=(0.3, 6.0))
    x, y = torch.randn(4, 4, 32, 32), torch.tensor([0, 1, 2, 3])
    for t, inside in [(0.0, False), (0.1, False), (0.5, True), (0.9, False)]:  # σ = (1-t)/t = ∞, 9, 1, 0.11
        tt = torch.full((4,), t)
        cond, null = m(x, tt, y), m(x, tt, torch.full_like(y, -1))
        guided = null + 3 * (cond - null) if inside else cond  # outside: a scale above 1 becomes 1
        assert torch.allclose(flow.guided(m, x, t, y, 3.0), guided, atol=1e-4)
        assert torch.allclose(flow.guided(m, x, t, y, 0.0), null, atol=1e-5)  # unconditional stays unconditional


# ----------------------------------------------------------------------------- data
def reference_raw_templates():
    """The README's formulas, written independently with numpy: (class, channel, 32, 32) before normalising."""
    u = np.linspace(-np.pi, np.pi, 32)
    x, y = u[None, :], u[:, None]  # x varies along a row (columns), y down a column (rows)
    r = np.sqrt(x ** 2 + y ** 2)
    pats = [
        np.sin(2 * x) + 0 * y,
        np.sin(4 * y) + 0 * x,
        np.sign(np.sin(3 * x) * np.sin(3 * y)),
        np.exp(-r ** 2 / 2) * np.cos(4 * r),
    ]
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
    assert x.shape == (2000, 4, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.bincount(y).tolist() == [500] * 4  # balanced
    assert torch.allclose(x.abs().amax(dim=(1, 2, 3)), torch.ones(2000))  # each sample: max |x| = 1 exactly
    raw = torch.tensor(reference_raw_templates(), dtype=torch.float32)[y]  # (N, 4, 32, 32)
    m = (raw * raw).sum(dim=(1, 2, 3)) / (x * raw).sum(dim=(1, 2, 3))  # the sample's divisor: x ≈ raw / m
    resid = x * m.view(-1, 1, 1, 1) - raw  # = the added noise if class, offsets and scaling are right
    assert abs(resid.std().item() - 0.05) < 0.002
    assert abs(resid.mean().item()) < 0.002
    offsets = ((x - x[:, :1]) * m.view(-1, 1, 1, 1)).mean(dim=(0, 2, 3))  # channel i - channel 0, unscaled
    assert torch.allclose(offsets, torch.tensor([0.0, 0.1, 0.2, 0.3]), atol=0.003)
    x2, _ = dit_flow.make_patterns(0)
    assert torch.equal(x, x2)  # deterministic from the seed
    assert not torch.equal(x, dit_flow.make_patterns(1)[0])


def test_template_scores():
    y = torch.arange(4)
    assert dit_flow.template_scores(dit_flow.TEMPLATES, y) == (1.0, 0.0)
    x, y = dit_flow.make_patterns(0, n=400)
    match, rms = dit_flow.template_scores(x, y)
    assert match == 1.0
    assert 0.04 < rms < 0.1  # real data: the noise (σ 0.05 before scaling) and the scaling
    match, _ = dit_flow.template_scores(x, (y + 1) % 4)  # wrong labels never match
    assert match == 0.0


# ----------------------------------------------------------------------------- flow matching
class Recorder(torch.nn.Module):
    """A 'model' that returns 0 and records what the loss feeds it."""

    def forward(self, x, t, y):
        self.seen = x, t, y
        return torch.zeros_like(x)


def test_loss_on_the_straight_path():
    torch.manual_seed(0)
    x1 = torch.rand(512, 1, 4, 4) * 2 - 1
    y = torch.arange(512) % 4
    m = Recorder()
    torch.manual_seed(1)
    loss = dit_flow.Flow("uniform", "v", label_dropout=0.25).loss(m, x1, y)
    torch.manual_seed(1)
    torch.rand(512)  # the label-dropout draw, then t, then the noise x0
    t = torch.rand(512)
    x0 = torch.randn_like(x1)
    xt, tt, yy = m.seen
    assert torch.equal(tt, t)
    tb = t.view(-1, 1, 1, 1)
    assert torch.allclose(xt, (1 - tb) * x0 + tb * x1)  # x_t = (1 - t) x0 + t x1
    assert torch.isclose(loss, ((x1 - x0) ** 2).mean())  # zero output: the loss is E|v|², v = x1 - x0
    assert 0.2 < (yy == -1).float().mean() < 0.3  # 25% null labels
    assert torch.equal(yy[yy != -1], y[yy != -1])  # the rest kept


def constant_model(out):
    """A 'model' whose output is `out`, in both halves of the CFG batch."""
    class Const:
        def __call__(self, x, t, y):
            return out.repeat(2, 1, 1, 1)
    return Const()


def test_x1_prediction_loss_and_velocity():
    """--prediction x1: the loss is E|x1 - out|²; sampling turns the guided output into
    v = (clip(out) - x_t)/(1 - t)."""
    torch.manual_seed(0)
    x1 = torch.rand(64, 1, 4, 4) * 2 - 1
    y = torch.arange(64) % 4
    m = Recorder()
    assert torch.isclose(dit_flow.Flow(prediction="x1").loss(m, x1, y), (x1 ** 2).mean())
    flow = dit_flow.Flow(prediction="x1")
    x = torch.randn(2, 1, 4, 4)
    for t in (0.0, 0.3, 0.95):
        out = torch.full((1, 1, 4, 4), 2.0)  # outside the data range: clipped to 1
        assert torch.allclose(flow.guided(constant_model(out), x, t, torch.tensor([0, 1]), 3.0), (1 - x) / (1 - t))
    target = torch.rand(1, 1, 4, 4) * 2 - 1  # a model that always predicts the same image: Euler lands on it
    for steps in (1, 4):
        gen = torch.Generator().manual_seed(0)
        got, _ = flow.sample(constant_model(target), (2, 1, 4, 4), torch.tensor([0, 1]), 1.0, "euler", steps, gen=gen)
        assert torch.allclose(got, target.expand(2, -1, -1, -1), atol=1e-6)

def test_t_sampling_uniform_and_logit_normal():
    """Uniform puts 10% of the times in each tenth of [0, 1]; logit-normal 1.4% below 0.1, 31.5% in (0.4, 0.6)."""
    u = dit_flow.Flow("uniform").sample_t(200000, "cpu")
    ln = dit_flow.Flow("logit-normal").sample_t(200000, "cpu")
    assert 0 <= u.min() and u.max() < 1
    assert torch.allclose(torch.histc(u, 10, 0, 1) / len(u), torch.full((10,), 0.1), atol=0.005)
    assert abs((ln < 0.1).float().mean() - 0.0140) < 0.002  # Φ(logit 0.1)
    assert abs(((ln > 0.4) & (ln < 0.6)).float().mean() - 0.3146) < 0.005  # Φ(logit 0.6) - Φ(logit 0.4)
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean()) < 0.01
    assert abs(logit.std() - 1) < 0.01


def integration_error(v, exact, steps, method):
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return (dit_flow.Flow.integrate(v, x0, steps, method)[0] - exact(x0)).abs().max().item()


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
    def v(x, t):  # dx/dt = 3 - 2t: x(1) = x0 + 2
        return 3 - 2 * t + 0 * x
    x0 = torch.zeros(1, dtype=torch.float64)
    for n in (1, 3, 10):  # Euler: left sums, error dt; Heun: trapezoids are exact but its last (Euler) step: dt²
        assert abs(dit_flow.Flow.integrate(v, x0, n, "euler")[0].item() - (2 + 1 / n)) < 1e-12
        assert abs(dit_flow.Flow.integrate(v, x0, n, "heun")[0].item() - (2 + 1 / n ** 2)) < 1e-12
    calls = []

    def counting(x, t):
        calls.append(t)
        return x
    dit_flow.Flow.integrate(counting, x0, 5, "euler")
    assert calls == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    calls.clear()
    dit_flow.Flow.integrate(counting, x0, 5, "heun")
    assert calls == pytest.approx([0, 0.2, 0.2, 0.4, 0.4, 0.6, 0.6, 0.8, 0.8])  # 2 calls a step; never at t = 1
    x, snaps = dit_flow.Flow.integrate(lambda x, t: x, torch.ones(1), 20, "euler", frames=5)
    assert len(snaps) == 6  # the start and 5 frames
    assert snaps[0].item() == 1
    assert torch.equal(snaps[-1], x)


def test_sample_starts_from_noise_and_follows_the_guided_velocity():
    m = randomise(tiny_dit())
    y = torch.tensor([0, 3])
    x, _ = FLOW.sample(m, (2, 4, 32, 32), y, 2.0, "euler", 1, gen=torch.Generator().manual_seed(5))
    x0 = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    cond, null = m(x0, torch.zeros(2), y), m(x0, torch.zeros(2), torch.full_like(y, -1))
    ref = x0 + null + 2.0 * (cond - null)  # one Euler step from t = 0 to 1 along the guided velocity
    assert torch.allclose(x, ref.clamp(-1, 1), atol=1e-5)


def test_tiny_dit_overfits_16_patterns():
    x1, y = dit_flow.make_patterns(0, n=16)
    torch.manual_seed(0)  # 64 wide: a token must carry its 4x4x4 patch values (32 is too narrow to learn -x_t)
    m = dit_flow.DiT(32, 4, 4, patch_size=4, hidden_size=64, depth=1, num_heads=4, stem_channels=0, out_conv=False)
    flow = dit_flow.Flow("uniform", "v", label_dropout=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = flow.loss(m, x1, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - (1 + x1.pow(2).mean().item())) < 0.05  # zero output: E|x1 - x0|² = 1 + E x1²
    assert np.mean(losses[-20:]) < 0.5 * losses[0]


def test_cli_patterns(tmp_path, capsys):
    """The default dataset end to end: grids of channel 0, the real-vs-generated figure and the template scores."""
    out = tmp_path / "run"
    argv = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4",
            "--sample-steps", "2", "--max-steps", "2", "--cfg-scales", "0", "3", "--num-samples", "8",
            "--out-dir", str(out), "--device", "cpu"]
    assert run_main(dit_flow, argv) == 0
    printed = capsys.readouterr().out
    assert "e001 cfg 3: 40 samples, euler 2 steps: class match" in printed
    assert "samples.npz: 8 samples" in printed
    assert (out / "metrics.csv").read_text().splitlines()[0] == "what,n,sampler,sample_steps,class_match,rms"
    assert len((out / "metrics.csv").read_text().splitlines()) == 4  # two grids and samples.npz
    # compare: 2 rows (real, generated) x 4 classes; each cell 4 channels of 32 px side by side, 1 px apart
    assert Image.open(out / "compare_e001.png").size == (2 * (4 * (4 * 33 - 1 + 2) + 2), 2 * (2 * 34 + 2))
    assert Image.open(out / "grid_e001_cfg3.png").size == (2 * (10 * 34 + 2), 2 * (4 * 34 + 2))
