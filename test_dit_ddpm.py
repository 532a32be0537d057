"""Unit tests for dit_ddpm.py: the DiT and the Diffusion object (schedules, targets, weights, samplers, CFG)."""
import math

import numpy as np
import pytest
import torch

import dit_ddpm
from conftest import randomise


# ----------------------------------------------------------------------------- dit_ddpm.py: model
def tiny_dit(**kw):
    torch.manual_seed(0)
    return dit_ddpm.DiT(28, 1, 10, **{"patch_size": 4, "hidden_size": 32, "depth": 2, "num_heads": 4, **kw})


@pytest.mark.parametrize("kw", [{}, {"stem_channels": 0, "out_conv": False}, {"depth": 5, "stem_channels": 8}])
def test_dit_shapes_and_zero_init(kw):
    m = tiny_dit(**kw)
    x, t, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 399]), torch.tensor([1, 2, -1])
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
    """Head h uses rows h·8..h·8+7 of each of the q, k and v thirds of the qkv weight: out = W_o [softmax(q_h k_hᵀ / √8)
    v_h for h = 0..3] + b_o, computed here head by head with an explicit softmax."""
    torch.manual_seed(0)
    attn = dit_ddpm.Attention(32, heads=4)
    x = torch.randn(2, 49, 32)
    W, b = attn.qkv.weight, attn.qkv.bias  # (96, 32), (96,): q rows 0..31, k rows 32..63, v rows 64..95
    heads = []
    for h in range(4):
        rows = [slice(part * 32 + h * 8, part * 32 + h * 8 + 8) for part in range(3)]
        q, k, v = (x @ W[r].T + b[r] for r in rows)  # (2, 49, 8) each
        weights = torch.exp(q @ k.transpose(1, 2) / math.sqrt(8))
        heads.append(weights / weights.sum(-1, keepdim=True) @ v)
    ref = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(attn(x), ref, atol=1e-5)
    assert not torch.allclose(attn(x), torch.cat(heads[::-1], dim=-1) @ attn.proj.weight.T + attn.proj.bias, atol=1e-3)


# ----------------------------------------------------------------------------- dit_ddpm.py: diffusion
def test_schedules_at_both_ends():
    lin = dit_ddpm.Diffusion(1000, "linear")
    cos = dit_ddpm.Diffusion(1000, "cosine")
    assert torch.isclose(lin.abar[0], torch.tensor(1 - 1e-4))
    assert 4.0e-5 < lin.abar[-1] < 4.1e-5  # exp(-Σβ), Σβ ≈ 10.05
    for T in (100, 200, 400):  # β scaled by 1000/T: still (nearly) pure noise at the last step, whatever T
        short = dit_ddpm.Diffusion(T, "linear")
        assert torch.isclose(short.abar[0], torch.tensor(1 - 1e-4 * 1000 / T)) and short.abar[-1] < 4.1e-5
    assert 0.9999 < cos.abar[0] < 1
    assert cos.abar[-1] < 1e-6  # cosine: ᾱ_T ≈ 0, pure noise at t = T

    def f(s):  # the cosine schedule's ᾱ(s) before normalising, s = t/T
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
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


class Oracle(torch.nn.Module):
    """The exact denoiser of a few points: E[x0 | x_t, y] is the softmax-weighted mean of the class's points."""

    def __init__(self, d, points, labels):
        super().__init__()
        self.d = d
        self.points = points
        self.labels = labels

    def forward(self, x, t, y):
        a = self.d.abar[t].view(-1, 1)
        xf, p = x.flatten(1), self.points.flatten(1)
        logits = -((xf[:, None] - a.sqrt()[:, None] * p[None]) ** 2).sum(-1) / (2 * (1 - a))  # log q(x_t | p)
        other_class = (self.labels[None] != y[:, None]) & (y[:, None] >= 0)  # the null label -1: none
        logits = logits.masked_fill(other_class, -math.inf)
        x0 = (logits.softmax(-1) @ p).view_as(x)
        sqrt_a = a.sqrt().view(-1, 1, 1, 1)  # √ᾱ
        sqrt_1ma = (1 - a).sqrt().view(-1, 1, 1, 1)  # √(1-ᾱ)
        eps = (x - sqrt_a * x0) / sqrt_1ma
        v = sqrt_a * eps - sqrt_1ma * x0
        return {"eps": eps, "v": v, "x0": x0}[self.d.prediction]


POINTS = torch.tensor([
    [-0.8, 0.6, 0.2, -0.4],
    [0.5, -0.5, 0.9, 0.1],
    [0.5, -0.5, 0.9, 0.1],
    [0.5, -0.5, 0.9, 0.1],
])
LABELS = torch.tensor([0, 1, 1, 1])  # class 1 holds 3 of the 4 points


@pytest.mark.parametrize("schedule,prediction,sampler,steps", [
    ("linear", "eps", "ddpm", 0),
    ("linear", "eps", "ddim", 20),
    ("cosine", "v", "ddpm", 0),
    ("cosine", "v", "ddim", 20),
    ("cosine", "v", "dpm++", 10),
    ("cosine", "v", "dpm++", 20),
    ("cosine", "x0", "dpm++", 10),
    ("linear", "eps", "dpm++", 20),
])
def test_samplers_land_on_the_points_with_their_frequencies(schedule, prediction, sampler, steps):
    d = dit_ddpm.Diffusion(1000, schedule, prediction)  # linear over 1000 steps: ᾱ_T = 4e-5
    m = Oracle(d, POINTS.view(4, 1, 2, 2), LABELS)
    gen = torch.Generator().manual_seed(0)
    n = 1000
    x, _ = d.sample(m, (n, 1, 2, 2), torch.zeros(n, dtype=torch.long), 0.0, sampler, steps, gen=gen)  # unconditional
    dist = torch.cdist(x.flatten(1), POINTS)  # (n, 4)
    assert dist.min(1).values.max() < 0.02  # every sample lands on a point
    share = (dist.argmin(1) >= 1).float().mean()  # the duplicated point: 3/4 of the mass
    assert abs(share - 0.75) < 0.05
    x, _ = d.sample(m, (200, 1, 2, 2), torch.zeros(200, dtype=torch.long), 1.0, sampler, steps, gen=gen)  # class 0
    assert torch.cdist(x.flatten(1), POINTS[:1]).max() < 0.02


def test_dpmpp_is_second_order_on_a_gaussian():
    """Data N(0, s²): E[x0|x_t] = √ᾱ s² / (ᾱ s² + 1 - ᾱ) x_t and the ODE keeps x_t / √(ᾱ s² + 1 - ᾱ) fixed."""
    s2 = 0.25

    class Gauss(torch.nn.Module):
        def forward(self, x, t, y):
            a = d.abar[t].view(-1, 1, 1, 1)
            return a.sqrt() * s2 / (a * s2 + 1 - a) * x  # x0-prediction

    d = dit_ddpm.Diffusion(1000, "cosine", "x0")
    y = torch.zeros(64, dtype=torch.long)
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    exact = x_T * s2 ** 0.5 / (d.abar[-1] * s2 + 1 - d.abar[-1]).sqrt()
    inside = exact.abs() < 0.9  # |x0 estimate| <= |x0| along the path: the [-1, 1] clip never acts here
    err = {}  # (sampler, steps) -> the largest error
    for k in ("dpm++", "ddim"):
        for n in (5, 10, 20):
            x, _ = d.sample(Gauss(), x_T.shape, y, 1.0, k, n, gen=torch.Generator().manual_seed(0))
            err[k, n] = (x - exact)[inside].abs().max()
    for n in (5, 10):  # twice the steps: the error / 4 at order 2, / 2 at order 1
        assert err["dpm++", n] / err["dpm++", 2 * n] > 3.5
        assert err["ddim", n] / err["ddim", 2 * n] < 2.2
    assert err["dpm++", 20] < err["ddim", 20] / 10


def test_cfg_scales():
    m = randomise(tiny_dit())
    d = dit_ddpm.Diffusion(400, cfg_interval=(0, math.inf))  # guidance at every step
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 9])
    t = torch.full((4,), 50)
    cond, null = m(x, t, y), m(x, t, torch.full_like(y, -1))
    assert not torch.allclose(cond, null, atol=1e-4)
    assert torch.allclose(d.guided(m, x, 50, y, 1.0), cond, atol=1e-5)  # s = 1: plain conditional
    assert torch.allclose(d.guided(m, x, 50, y, 0.0), null, atol=1e-5)  # s = 0: unconditional
    assert torch.allclose(d.guided(m, x, 50, y, 3.0), null + 3 * (cond - null), atol=1e-4)


def test_cfg_interval_guides_only_inside_it():
    m = randomise(tiny_dit())
    d = dit_ddpm.Diffusion(400, "cosine", cfg_interval=(0.3, 6.0))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 9])
    for t, inside in [(399, False), (222, True), (20, False)]:  # σ = 8120, 1.21, 0.07
        tt = torch.full((4,), t)
        cond, null = m(x, tt, y), m(x, tt, torch.full_like(y, -1))
        guided = null + 3 * (cond - null) if inside else cond  # outside: a scale above 1 becomes 1
        assert torch.allclose(d.guided(m, x, t, y, 3.0), guided, atol=1e-4)
        assert torch.allclose(d.guided(m, x, t, y, 0.0), null, atol=1e-5)  # unconditional stays unconditional
        per_sample = torch.tensor([0.0, 1.0, 3.0, 3.0]).view(-1, 1, 1, 1)  # the grids' per-row scales
        assert torch.allclose(d.guided(m, x, t, y, per_sample), null + per_sample.clamp(max=3 if inside else 1)
                              * (cond - null), atol=1e-4)


def test_cfg_scale_1_sampling_equals_the_conditional_model():
    d = dit_ddpm.Diffusion(100, "cosine", "v")
    m = randomise(tiny_dit())

    def cond(x, t, y):  # the null half sees a label too
        return m(x, t, y.abs())
    y = torch.tensor([0, 3])
    for sampler in ("dpm++", "ddim"):
        a, _ = d.sample(m, (2, 1, 28, 28), y, 1.0, sampler, 8, gen=torch.Generator().manual_seed(5))
        b, _ = d.sample(cond, (2, 1, 28, 28), y, 1.0, sampler, 8, gen=torch.Generator().manual_seed(5))
        assert torch.allclose(a, b, atol=1e-5)


def test_tiny_dit_overfits_64_images():
    torch.manual_seed(0)
    y = torch.arange(64) % 10
    x0 = -torch.ones(64, 1, 28, 28)  # one bar per class, at a class-dependent height
    for i, c in enumerate(y):
        x0[i, 0, 2 + 2 * c: 5 + 2 * c, 4:24] = 1
    m = tiny_dit()
    d = dit_ddpm.Diffusion(100, label_dropout=0.0)
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


@pytest.mark.parametrize("kw", [{"hidden_size": 34, "num_heads": 2}, {"hidden_size": 32, "num_heads": 3},
                                {"patch_size": 5}])
def test_sizes_the_model_cannot_take_are_refused_when_it_is_built(kw):
    """The 2-D position table takes 4 channels a frequency and the heads split the width: a width that is not a multiple
    of both, or a patch that does not divide the image, fails at once rather than at the first forward."""
    with pytest.raises(ValueError, match="multiple of 4 and of num_heads"):
        dit_ddpm.DiT(28, 1, 10, **{"hidden_size": 32, "depth": 1, "num_heads": 2, **kw})
