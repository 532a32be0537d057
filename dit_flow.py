"""Class-conditional Diffusion Transformer (DiT, adaLN-Zero) trained with flow matching (straight path from noise
to data, velocity target) on synthetic class patterns or MNIST, sampled with classifier-free guidance (CFG)
by Euler or Heun integration of the learned velocity field.

    python dit_flow.py --device cuda                           # reference config (256 wide, 6 deep), patterns
    python dit_flow.py --hidden-size 128 --depth 2 --num-heads 4 --patch-size 4 --batch-size 32 --lr 3e-3 \\
        --warmup-steps 50 --epochs 24 --cfg-scales 1 3 --device cpu   # CPU-sized: 100% class match in ~6 min
    python dit_flow.py --dataset mnist --data-dir ./data --epochs 10   # the same model and objective on MNIST
    python dit_flow.py --sample-only --ckpt runs/dit_flow/ckpt.pt --sampler heun --sample-steps 5 --num-samples 400

Writes to --out-dir (default runs/dit_flow): per epoch one grid per CFG scale (grid_eNNN_cfgS.png,
row = class), a GIF of the sampling trajectory (denoise_eNNN.gif), a real-vs-generated figure (compare_eNNN.png:
row 1 real, row 2 generated at the last CFG scale, one column per class) and ckpt.pt; at the end loss.csv and
loss.png; with --num-samples N also samples.npz (x in [0, 1], labels y). --sample-only writes the *_sample.*
versions (compare_sample.png for patterns only: no data is loaded). The 4-channel patterns are drawn in gray:
channel 0 in grids and GIFs, all 4 side by side in compare_*.png. On the synthetic set every sampling prints
and records (metrics.csv; metrics_sample.csv for --sample-only) the class match (share of samples whose nearest
noise-free class template is the requested class) and the mean RMS error to the requested class's template.
With patch 4 keep --hidden-size >= 128: each token carries its 4x4x4 = 64 pixel values (64 wide stalled at 50%).

Flow: x_t = (1 - t) x0 + t x1 with noise x0 at t = 0 and data x1 at t = 1; the model predicts v = x1 - x0.
Guidance: v = v_null + s * (v_cond - v_null), so s = 0 is unconditional, s = 1 plain conditional.
"""
import argparse
import copy
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (UsageError, any_rank, atomic_save, benchmark, die, ema_update, format_time, init_distributed,
                    load_checkpoint, load_dataset, lr_at, pick_device, pos_embed_2d, prepare_out_dir, rng_state,
                    save_gif, save_grid, save_loss, seed_everything, set_rng_state, take_recipe, timestep_embedding)

SCRIPT = "dit_flow"
DATA_SHAPES = {"patterns": (4, 32, 4), "mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10)}  # channels, size, classes
# the model and training recipe come from the checkpoint on --resume / --sample-only
RECIPE = ["dataset", "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "t_sampling", "batch_size",
          "lr", "weight_decay", "warmup_steps", "ema_decay", "label_dropout", "grad_clip", "seed"]


# ----------------------------------------------------------------------------- config
def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="patterns", help="patterns (synthetic, 4 classes) | mnist | fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default=f"runs/{SCRIPT}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    # flow matching
    p.add_argument("--t-sampling", default="uniform", help="uniform | logit-normal (t = sigmoid(u), u ~ N(0, 1))")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null class in training")
    # training
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=int, default=50, help="print the mean loss of the last N steps")
    p.add_argument("--resume", default="", help="continue training from this checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out-dir")
    p.add_argument("--benchmark", action="store_true", help="time training steps and sampling on random data")
    # sampling
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", default="")
    p.add_argument("--sampler", default="euler", help="euler (1st order) | heun (2nd order; the last step is Euler)")
    p.add_argument("--sample-steps", type=int, default=20, help="integration steps from t = 0 to 1")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--num-samples", type=int, default=0, help="write samples.npz with this many samples")
    return p


def check_args(a):
    """Every out-of-range flag is a UsageError (one line, exit 2) before anything is written."""
    if a.dataset not in DATA_SHAPES:
        raise UsageError(f"unknown --dataset '{a.dataset}' (choose from {', '.join(DATA_SHAPES)})")
    if a.sampler not in ("euler", "heun"):
        raise UsageError(f"unknown --sampler '{a.sampler}' (choose euler or heun)")
    if a.t_sampling not in ("uniform", "logit-normal"):
        raise UsageError(f"unknown --t-sampling '{a.t_sampling}' (choose uniform or logit-normal)")
    for name in ("hidden_size", "depth", "num_heads", "patch_size", "epochs", "batch_size", "sample_steps",
                 "log_every"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("max_steps", "num_samples", "warmup_steps", "weight_decay", "grad_clip"):
        if getattr(a, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(a, name)})")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise UsageError(f"--lr must be a positive number (got {a.lr})")
    if a.mlp_ratio <= 0:
        raise UsageError(f"--mlp-ratio must be > 0 (got {a.mlp_ratio})")
    if not (0 <= a.label_dropout < 1) or not (0 <= a.ema_decay < 1):
        raise UsageError("--label-dropout and --ema-decay must be in [0, 1)")
    if any(not math.isfinite(s) or s < 0 for s in a.cfg_scales):
        raise UsageError(f"--cfg-scales must be finite and >= 0 (got {a.cfg_scales})")
    if a.hidden_size % a.num_heads:
        raise UsageError(f"--hidden-size {a.hidden_size} is not divisible by --num-heads {a.num_heads}")
    if a.hidden_size % 4:
        raise UsageError(f"--hidden-size must be a multiple of 4 (2-D sin-cos position table), got {a.hidden_size}")
    size = DATA_SHAPES[a.dataset][1]
    if size % a.patch_size:
        raise UsageError(f"--patch-size {a.patch_size} does not divide the image size {size} of {a.dataset}")


# ----------------------------------------------------------------------------- data
N_PATTERNS, PATTERN_NOISE = 2000, 0.05


def pattern_templates(size=32):
    """The 4 noise-free classes on a size x size grid over [-π, π]² as (class, channel, H, W), before scaling."""
    u = torch.linspace(-math.pi, math.pi, size, dtype=torch.float64)
    y, x = torch.meshgrid(u, u, indexing="ij")  # row = y, column = x
    r = (x ** 2 + y ** 2).sqrt()
    base = torch.stack([torch.sin(2 * x),  # class 0: vertical stripes
                        torch.sin(4 * y),  # class 1: horizontal stripes
                        torch.sign(torch.sin(3 * x) * torch.sin(3 * y)),  # class 2: checkerboard
                        torch.exp(-r ** 2 / 2) * torch.cos(4 * r)])  # class 3: damped rings
    return base[:, None] + 0.1 * torch.arange(4, dtype=torch.float64).view(1, 4, 1, 1)  # channel i = pattern + 0.1 i


def normalise(x):
    return x / x.abs().amax(dim=(1, 2, 3), keepdim=True)  # each sample / its max |value|: max |x| = 1


TEMPLATES = normalise(pattern_templates()).float()  # (4, 4, 32, 32): noise-free, normalised like the data


def make_patterns(seed, n=N_PATTERNS):
    """The synthetic set: n samples, balanced labels (i % 4), Gaussian noise σ = 0.05, deterministic from seed."""
    y = torch.arange(n) % 4
    raw = pattern_templates()[y]  # (n, 4, 32, 32)
    noise = torch.randn(raw.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return normalise(raw + PATTERN_NOISE * noise).float(), y


def load_data(a):
    """(images, labels): patterns as floats in [-1, 1], MNIST-likes as uint8 through common.load_dataset."""
    return make_patterns(a.seed) if a.dataset == "patterns" else load_dataset(a.dataset, a.data_dir)


def as_float(x):
    """Images as floats in [-1, 1]: uint8 is rescaled, the float patterns pass through."""
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x


def template_scores(x, y):
    """Share of samples whose nearest template is their class y, and the mean RMS error to the template of y."""
    rms = (x.float().cpu()[:, None] - TEMPLATES).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (N, 4): to every template
    y = y.cpu()
    return (rms.argmin(1) == y).float().mean().item(), rms[torch.arange(len(y)), y].mean().item()


# ----------------------------------------------------------------------------- model
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D) with per-sample (N, D)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, heads split by hand, SDPA for the core."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (N, T, D)
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √Dh) v, flash kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are shifted, scaled and gated by the condition (adaLN-Zero)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):  # x (N, T, D), c (N, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # 6 x (N, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from each token to its patch's pixels."""

    def __init__(self, dim, patch, channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch * patch * channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, p*p*C)


class DiT(nn.Module):
    """Patchify -> + fixed 2-D position table -> adaLN-Zero blocks conditioned on (t, y) -> unpatchify."""

    def __init__(self, img_size=28, channels=1, patch=4, dim=384, depth=12, heads=6, mlp_ratio=4.0, num_classes=10,
                 freq_dim=256):
        super().__init__()
        self.channels, self.patch, self.grid, self.freq_dim = channels, patch, img_size // patch, freq_dim
        self.num_classes = num_classes  # label `num_classes` is the null label used for CFG
        self.patch_embed = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", pos_embed_2d(dim, self.grid)[None], persistent=False)  # (1, T, D)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # one extra row: the null class
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(dim, patch, channels)
        self.init_weights()

    def init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # initialised like a Linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: the modulation layers and the output layer start at zero, so every block is the
        # identity (gates = 0) and the untrained network outputs exactly 0; training opens the gates.
        for blk in [*self.blocks, self.final]:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def unpatchify(self, x):  # (N, T, p*p*C) -> (N, C, H, W)
        N, g, p, C = x.shape[0], self.grid, self.patch, self.channels
        x = x.view(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return x.reshape(N, C, g * p, g * p)

    def forward(self, x, t, y):  # x (N, C, H, W), t (N,) time in [0, 1], y (N,) label or null
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        # t is embedded as 1000 t: with raw t in [0, 1], the sin-cos periods of up to 10000 would leave most
        # frequencies nearly constant; 1000 t spans them like DDPM's integer timesteps do.
        c = self.t_mlp(timestep_embedding(1000 * t, self.freq_dim)) + self.y_embed(y)  # (N, D)
        for blk in self.blocks:
            x = blk(x, c)
        return self.unpatchify(self.final(x, c))


def build_model(a):
    channels, size, classes = DATA_SHAPES[a.dataset]
    return DiT(size, channels, a.patch_size, a.hidden_size, a.depth, a.num_heads, a.mlp_ratio, classes)


# ----------------------------------------------------------------------------- flow matching
def sample_t(n, how, device):
    """Training times in [0, 1]: uniform, or logit-normal (more weight mid-path, as in SD3)."""
    if how == "logit-normal":
        return torch.sigmoid(torch.randn(n, device=device))  # t = σ(u), u ~ N(0, 1)
    return torch.rand(n, device=device)


def straight_path(x0, x1, t):
    """Point and velocity on the straight line from noise x0 (t = 0) to data x1 (t = 1); t is (N,)."""
    t = t.view(-1, 1, 1, 1)
    return (1 - t) * x0 + t * x1, x1 - x0  # x_t = (1-t) x0 + t x1,  v = dx_t/dt = x1 - x0


def guided_v(model, x, t, y, scale):
    """CFG in one batched forward: v = v_null + s * (v_cond - v_null); scale is a float or (N, 1, 1, 1)."""
    null = torch.full_like(y, model.num_classes)
    v_cond, v_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return v_null + scale * (v_cond - v_null)


def integrate(velocity_fn, x, steps, method="euler", frames=0):
    """Solve dx/dt = velocity_fn(x, t) from t = 0 to 1 in equal steps; returns x(1) and up to `frames` snapshots.

    Heun's last step is an Euler step (as in EDM): at t = 1 the noise x0 can no longer be read from x_t, so the
    learned v(x, 1) ≈ x - E[x0] says nothing about the path; one O(dt²) local error keeps the method 2nd order.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown method {method}")
    ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
    snaps, every = [x], max(1, steps // frames) if frames else 0
    for i in range(steps):
        dt = ts[i + 1] - ts[i]
        v = velocity_fn(x, ts[i])
        if method == "heun" and i + 1 < steps:  # v = (v(x, t) + v(x + dt v, t + dt)) / 2: trapezoid, O(dt²)
            v = (v + velocity_fn(x + dt * v, ts[i + 1])) / 2
        x = x + dt * v  # Euler: x_{t+dt} = x_t + dt v, error O(dt)
        if frames and ((i + 1) % every == 0 or i + 1 == steps):
            snaps.append(x)
    return x, snaps


@torch.no_grad()
def sample(model, y, scale, sampler="euler", steps=20, gen=None, frames=0, amp=False):
    """Draw len(y) images in [-1, 1] (and up to `frames` snapshots of the trajectory)."""
    dev = y.device
    C, S = model.channels, model.grid * model.patch
    x = torch.randn(len(y), C, S, S, device=dev, generator=gen)  # x0 ~ N(0, I) at t = 0

    def velocity(x, t):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            return guided_v(model, x, torch.full((len(y),), t, device=dev), y, scale)
    x, snaps = integrate(velocity, x, steps, sampler, frames)
    return x.clamp(-1, 1), snaps


# ----------------------------------------------------------------------------- training
def viewable(x, all_channels=False):
    """(N, C, H, W) in [-1, 1] -> gray images in [0, 1]: channel 0, or all channels side by side."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1 or not all_channels:
        return x[:, :1]
    x = F.pad(x, (0, 1), value=1)  # (N, C, H, W + 1): a white line after each channel
    return x.permute(0, 2, 1, 3).reshape(len(x), 1, x.shape[2], -1)[..., :-1]  # (N, 1, H, C (W+1) - 1)


def score(a, x, y, what, scale):
    """On the synthetic set: print and return class match and RMS to template of samples x for labels y."""
    match, rms = template_scores(x, y)
    print(f"{what}: class match {100 * match:.1f}% RMS to template {rms:.4f} "
          f"({len(x)} samples, cfg {scale:g}, {a.sampler} {a.sample_steps} steps)")
    return {"what": what, "cfg_scale": scale, "sampler": a.sampler, "sample_steps": a.sample_steps, "n": len(x),
            "class_match": round(match, 6), "rms_to_template": round(rms, 6)}


def write_metrics(rows, path):
    if rows:
        with open(path, "w") as f:
            f.write(",".join(rows[0]) + "\n" + "".join(",".join(str(v) for v in r.values()) + "\n" for r in rows))


def save_samples(a, ema, dev, tag, amp, real=None):
    """One grid per CFG scale (row = class), a GIF of the last scale and, given one real image per class, the
    real-vs-generated figure, all from one batched sampling run. Returns the synthetic set's scores."""
    classes, n = ema.num_classes, 10
    y = torch.arange(classes, device=dev).repeat_interleave(n).repeat(len(a.cfg_scales))
    scale = torch.tensor(a.cfg_scales, device=dev).repeat_interleave(classes * n).view(-1, 1, 1, 1)
    gen = torch.Generator(dev).manual_seed(a.seed)  # fixed noise: grids are comparable across epochs
    x, snaps = sample(ema, y, scale, a.sampler, a.sample_steps, gen, frames=40, amp=amp)
    rows = []
    for i, s in enumerate(a.cfg_scales):
        xs = x[i * classes * n:(i + 1) * classes * n]
        save_grid(viewable(xs), os.path.join(a.out_dir, f"grid_{tag}_cfg{s:g}.png"), n)
        if a.dataset == "patterns":
            rows.append(score(a, xs, y[:classes * n], f"{tag} cfg {s:g}", s))
    save_gif([viewable(f[-classes * n:]) for f in snaps], os.path.join(a.out_dir, f"denoise_{tag}.gif"), n)
    if real is not None:  # row 1 real, row 2 the first generated image of each class at the last scale
        save_grid(viewable(torch.cat([real.to(dev), x[-classes * n::n]]), all_channels=True),
                  os.path.join(a.out_dir, f"compare_{tag}.png"), classes)
    return rows


def write_npz(a, ema, dev, amp, chunk=500):
    """samples.npz: num-samples images (x in [0, 1], (N, C, H, W)) with balanced labels y, first CFG scale."""
    y_all = torch.arange(a.num_samples) % ema.num_classes
    gen = torch.Generator(dev).manual_seed(a.seed + 1)
    xs = [sample(ema, y.to(dev), a.cfg_scales[0], a.sampler, a.sample_steps, gen, amp=amp)[0]
          for y in y_all.split(chunk)]
    x = torch.cat(xs)
    path = os.path.join(a.out_dir, "samples.npz")
    np.savez_compressed(path, x=((x + 1) / 2).float().cpu().numpy(), y=y_all.numpy(), cfg_scale=a.cfg_scales[0],
                        sampler=a.sampler, sample_steps=a.sample_steps)
    print(f"wrote {path}: {len(x)} samples, cfg scale {a.cfg_scales[0]:g}, sampler {a.sampler}")
    return [score(a, x, y_all, "samples.npz", a.cfg_scales[0])] if a.dataset == "patterns" else []


def train_step(a, net, model, ema, opt, x1, y, step, total):
    """One optimiser step on a batch of data x1 in [-1, 1]; returns the loss as a tensor (no host sync)."""
    y = torch.where(torch.rand(len(y), device=y.device) < a.label_dropout, model.num_classes, y)  # CFG dropout
    t = sample_t(len(y), a.t_sampling, y.device)
    xt, v = straight_path(torch.randn_like(x1), x1, t)  # noise x0 ~ N(0, I)
    with torch.autocast(x1.device.type, dtype=torch.bfloat16, enabled=a.amp):
        pred = net(xt, t, y)
    loss = F.mse_loss(pred.float(), v)  # L = E ||v - v_θ(x_t, t, y)||²
    for g in opt.param_groups:
        g["lr"] = lr_at(step, a.lr, a.warmup_steps, total)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
    opt.step()
    ema_update(ema, model, step, a.ema_decay)
    return loss.detach()


def train(a, dev, model, ema, opt, ckpt, data, rank=0, world=1):
    """The loop: data on the device (uint8, or float patterns), shuffled per epoch by index, host syncs only to log."""
    x_all, y_all = data[0].to(dev), data[1].to(dev)
    B, N = a.batch_size, len(x_all)
    per_epoch = N // (B * world)  # every rank takes its own B images of the shared permutation
    total = a.epochs * per_epoch
    stop_at = min(total, a.max_steps) if a.max_steps else total
    step, log, scores = (ckpt["step"], ckpt["loss_log"], ckpt["metrics"]) if ckpt else (0, [], [])
    real = as_float(x_all[[int((y_all == k).nonzero()[0]) for k in range(model.num_classes)]])  # 1 a class
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    net = torch.compile(net) if a.compile else net
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))

    def checkpoint():
        if rank == 0:
            atomic_save({"script": SCRIPT, "model": model.state_dict(), "ema": ema.state_dict(),
                         "opt": opt.state_dict(), "step": step, "epoch": step // per_epoch, "args": vars(a),
                         "rng": rng_state(), "loss_log": log, "metrics": scores}, os.path.join(a.out_dir, "ckpt.pt"))

    say = print if rank == 0 else (lambda *_, **__: None)
    say(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M params on {N} images, {world} "
        f"process(es) x batch {B}, {per_epoch} steps/epoch, steps {step}..{stop_at} of {total}, {dev}, amp {a.amp}")
    loss_sum, n_sum, t0, s0 = torch.zeros((), device=dev), 0, time.time(), step
    while step < stop_at:
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(a.seed * 1000 + epoch)).to(dev)
        for i in range(i, per_epoch):
            idx = perm[(i * world + rank) * B:(i * world + rank + 1) * B]
            loss_sum += train_step(a, net, model, ema, opt, as_float(x_all[idx]), y_all[idx], step, total)
            n_sum, step = n_sum + 1, step + 1
            logging = step % a.log_every == 0 or step == stop_at
            if logging:
                mean = loss_sum.item() / n_sum  # the only host sync
                if not math.isfinite(mean):
                    print(f"error: loss is {mean} at step {step}; stopping, {a.out_dir}/ckpt.pt keeps the "
                          f"last good state (try a lower --lr)", file=sys.stderr)
                    sys.exit(1)
                log.append((step, mean))
                ips = (step - s0) * B * world / (time.time() - t0)
                say(f"epoch {epoch + 1}/{a.epochs} step {step}/{stop_at} loss {mean:.4f} "
                    f"img/s {ips:.0f} eta {format_time((stop_at - step) * B * world / ips)}", flush=True)
                loss_sum.zero_()
                n_sum = 0
            if (logging or world == 1) and any_rank(stop, world, dev):  # all ranks stop at the same step
                checkpoint()
                say(f"interrupted at step {step}; checkpoint saved. Resume with:\n  python {SCRIPT}.py --resume "
                    f"{a.out_dir}/ckpt.pt --out-dir {a.out_dir} --data-dir {a.data_dir} --epochs {a.epochs}")
                return
            if step == stop_at:
                break
        if rank == 0:
            scores += [{"step": step, **r} for r in save_samples(a, ema, dev, f"e{epoch + 1:03d}", a.amp, real)]
            write_metrics(scores, os.path.join(a.out_dir, "metrics.csv"))
        checkpoint()
        t0, s0 = time.time(), step  # img/s and ETA count training only
    if rank == 0:
        save_loss(log, a.out_dir, f"{SCRIPT}: training loss (MSE on v)")
        if a.num_samples:
            scores += [{"step": step, **r} for r in write_npz(a, ema, dev, a.amp)]
            write_metrics(scores, os.path.join(a.out_dir, "metrics.csv"))
    say(f"done: {step} steps; outputs in {a.out_dir}")


def run_benchmark(a, dev, model, ema, opt):
    """--benchmark: training steps on random data and one sampling run of 100 guided images; writes nothing."""
    C, S, K = DATA_SHAPES[a.dataset]
    x1, y = torch.rand(a.batch_size, C, S, S, device=dev) * 2 - 1, torch.arange(a.batch_size, device=dev) % K
    net = torch.compile(model) if a.compile else model
    y100 = torch.arange(100, device=dev) % K
    nfe = 2 * a.sample_steps - 1 if a.sampler == "heun" else a.sample_steps

    def sample_100():
        sample(ema, y100, a.cfg_scales[-1], a.sampler, a.sample_steps, amp=a.amp)
        return f"100 samples, cfg {a.cfg_scales[-1]:g}, {a.sampler} {a.sample_steps} steps ({nfe} model calls)"
    benchmark(lambda: train_step(a, net, model, ema, opt, x1, y, a.warmup_steps, 10**9), sample_100,
              a.batch_size, dev)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a = get_parser().parse_args(argv)
    if a.sample_only and not a.ckpt:
        raise UsageError("--sample-only needs --ckpt PATH")
    rank, world, dev = init_distributed(pick_device(a.device))
    a.amp = dev.type == "cuda" if a.amp is None else a.amp
    ckpt = load_checkpoint(a.resume or a.ckpt, SCRIPT) if (a.resume or a.sample_only) else None
    if ckpt:  # run length, sampling and paths are this command's
        take_recipe(a, ckpt, a.resume or a.ckpt, get_parser(), RECIPE)
    check_args(a)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seed_everything(a.seed)  # the same initial weights on every rank
    model = build_model(a).to(dev)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=dev.type == "cuda")
    if ckpt:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            if a.resume:
                opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise UsageError(f"checkpoint {a.resume or a.ckpt} does not fit this model ({str(e).splitlines()[0][:100]})")
        if a.resume:
            set_rng_state(ckpt["rng"])
    if world > 1:  # each rank draws its own noise
        torch.manual_seed(a.seed + 1000 * rank + (ckpt["step"] if ckpt else 0))
    if a.benchmark:
        return run_benchmark(a, dev, model, ema, opt)
    data = None if a.sample_only else load_data(a)  # before anything is written
    if data and len(data[0]) < a.batch_size * world:
        raise UsageError(f"--batch-size {a.batch_size} x {world} is larger than the dataset ({len(data[0])} images)")
    if data and a.dataset == "patterns" and rank == 0:
        print(f"patterns: the real data's RMS to template is {template_scores(*data)[1]:.4f}, for reference")
    if rank == 0:
        if a.sample_only:
            os.makedirs(a.out_dir, exist_ok=True)
        else:
            prepare_out_dir(a.out_dir, a.resume, a.overwrite)
    if a.sample_only:  # real images for the comparison only where they cost nothing: the synthetic set
        real = make_patterns(a.seed)[0][:4] if a.dataset == "patterns" else None  # labels 0..3
        rows = save_samples(a, ema, dev, "sample", a.amp, real)
        if a.num_samples:
            rows += write_npz(a, ema, dev, a.amp)
        write_metrics(rows, os.path.join(a.out_dir, "metrics_sample.csv"))
        print(f"wrote samples to {a.out_dir}")
        return
    train(a, dev, model, ema, opt, ckpt, data, rank, world)
    if world > 1:  # DDP keeps the ranks' weights identical: a checksum each shows it
        print(f"rank {rank} weights checksum {sum(p.double().sum().item() for p in model.parameters()):.12e}")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(e)
