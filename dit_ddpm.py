"""Class-conditional Diffusion Transformer (DiT, adaLN-Zero) trained with DDPM on MNIST, sampled with
classifier-free guidance (CFG) by DDPM (ancestral) or DDIM.

    python dit_ddpm.py --epochs 10 --device cuda               # reference config (384 wide, 12 deep), GPU
    python dit_ddpm.py --hidden-size 128 --depth 4 --num-heads 4 --epochs 3 --lr 1e-3   # CPU-sized
    python dit_ddpm.py --sample-only --ckpt runs/dit_ddpm/ckpt.pt --num-samples 1000 --cfg-scales 3

Writes to --out-dir (default runs/dit_ddpm): per epoch one grid per CFG scale (grid_eNNN_cfgS.png,
row = class 0..9), a GIF of the reverse process (denoise_eNNN.gif) and ckpt.pt; at the end
loss.csv and loss.png; with --num-samples N also samples.npz (x in [0, 1], labels y) for evaluate.py.

Guidance: eps = eps_null + s * (eps_cond - eps_null), so s = 0 is unconditional, s = 1 plain conditional.
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
                    load_checkpoint, load_dataset, lr_at, Parser, pick_device, pos_embed_2d, prepare_out_dir, rng_state,
                    save_gif, save_grid, save_loss, seed_everything, set_rng_state, take_recipe, timestep_embedding)

SCRIPT = "dit_ddpm"
DATA_SHAPES = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10)}  # channels, size, classes
# the model and training recipe come from the checkpoint on --resume / --sample-only
RECIPE = ["dataset", "hidden_size", "depth", "num_heads", "patch_size", "mlp_ratio", "timesteps", "schedule",
          "prediction", "snr_gamma", "batch_size",
          "lr", "weight_decay", "warmup_steps", "ema_decay", "label_dropout", "grad_clip", "seed"]


# ----------------------------------------------------------------------------- config
def get_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default=f"runs/{SCRIPT}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=4.0)
    # diffusion
    p.add_argument("--timesteps", type=int, default=400)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine"], help="noise schedule ᾱ_t")
    p.add_argument("--prediction", default="eps", choices=["eps", "v", "x0"], help="what the network predicts")
    p.add_argument("--snr-gamma", type=float, default=0.0, help="min-SNR-γ loss weighting (0: plain MSE on the target)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null class in training")
    # training
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=200)
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
    p.add_argument("--sampler", default="ddim", choices=["ddpm", "ddim", "dpm++"],
                   help="ddpm (ancestral, all steps) | ddim | dpm++ (DPM-Solver++(2M))")
    p.add_argument("--sample-steps", type=int, default=50, help="model evaluations for ddim / dpm++")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 = DDPM posterior")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--num-samples", type=int, default=0, help="write samples.npz with this many samples")
    return p


def check_args(a):
    """Every out-of-range flag is a UsageError (one line, exit 2) before anything is written."""
    if a.dataset not in DATA_SHAPES:
        raise UsageError(f"unknown --dataset '{a.dataset}' (choose from {', '.join(DATA_SHAPES)})")
    for name in ("hidden_size", "depth", "num_heads", "patch_size", "timesteps", "epochs", "batch_size",
                 "sample_steps", "log_every"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("max_steps", "num_samples", "warmup_steps", "weight_decay", "grad_clip", "eta", "snr_gamma"):
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
        raise UsageError(f"--patch-size {a.patch_size} does not divide the image size {size}")
    if a.sampler != "ddpm" and a.sample_steps > a.timesteps:
        raise UsageError(f"--sample-steps {a.sample_steps} is above --timesteps {a.timesteps}")


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

    def forward(self, x, t, y):  # x (N, C, H, W), t (N,) timestep index, y (N,) label or null
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        c = self.t_mlp(timestep_embedding(t, self.freq_dim)) + self.y_embed(y)  # (N, D)
        for blk in self.blocks:
            x = blk(x, c)
        return self.unpatchify(self.final(x, c))


def build_model(a):
    channels, size, classes = DATA_SHAPES[a.dataset]
    return DiT(size, channels, a.patch_size, a.hidden_size, a.depth, a.num_heads, a.mlp_ratio, classes)


# ----------------------------------------------------------------------------- diffusion
class Diffusion:
    """Discrete-time Gaussian diffusion: noise schedule, training loss, and DDPM / DDIM / DPM-Solver++ with CFG."""

    def __init__(self, timesteps, schedule="linear", prediction="eps", snr_gamma=0.0, label_dropout=0.1,
                 num_classes=10, device="cpu"):
        self.T, self.prediction, self.snr_gamma = timesteps, prediction, snr_gamma
        self.label_dropout, self.null = label_dropout, num_classes  # label `num_classes` is the null label
        if schedule == "linear":  # β_t from 1e-4 to 0.02 (DDPM): ᾱ_T = 0.0175 at T = 400, the image still shows
            betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        else:  # cosine: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), s = t/T, ends at ᾱ_T ≈ 0 (pure noise)
            f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.abar = torch.cumprod(1 - betas, dim=0).float().to(device)  # ᾱ_t = Π_{s<=t} (1 - β_s)

    def abar_at(self, t):  # ᾱ_{-1} = 1: the step after t = 0 is the clean image
        return self.abar[t] if t >= 0 else torch.ones((), device=self.abar.device)

    @staticmethod
    def lam(a):  # half log-SNR λ = log(√ᾱ / √(1-ᾱ)); +∞ for the clean image
        return 0.5 * torch.log(a / (1 - a)) if a < 1 else torch.tensor(math.inf, device=a.device)

    def loss(self, model, x0, y):
        """E_t,ε w(t) ||target - model(x_t, t, y)||² with labels dropped to null for CFG; x0 in [-1, 1]."""
        y = torch.where(torch.rand(len(y), device=y.device) < self.label_dropout, self.null, y)
        t = torch.randint(0, self.T, (len(y),), device=y.device)
        eps = torch.randn_like(x0)
        a = self.abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps  # x_t = √ᾱ x0 + √(1-ᾱ) ε  ~ q(x_t | x0)
        target = {"eps": eps, "v": a.sqrt() * eps - (1 - a).sqrt() * x0, "x0": x0}[self.prediction]  # v = √ᾱ ε - √(1-ᾱ) x0
        mse = ((model(xt, t, y).float() - target) ** 2).mean((1, 2, 3))  # (N,)
        return (self.weight(a.flatten()) * mse).mean()

    def weight(self, a):
        """Loss weight at ᾱ: 1, or min-SNR-γ = min(SNR, γ) on the x0 error written in the target's units."""
        if not self.snr_gamma:
            return torch.ones_like(a)
        snr = a / (1 - a)  # SNR = ᾱ / (1-ᾱ); ||ε-error||² = SNR ||x0-error||², ||v-error||² = (SNR+1) ||x0-error||²
        return snr.clamp(max=self.snr_gamma) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.prediction]

    def denoise(self, out, x, t):
        """Model output at step t -> (x0, ε) estimates, x0 clipped to the data range [-1, 1]."""
        a = self.abar[t]
        x0 = {"eps": lambda: (x - (1 - a).sqrt() * out) / a.sqrt(), "v": lambda: a.sqrt() * x - (1 - a).sqrt() * out,
              "x0": lambda: out}[self.prediction]().clamp(-1, 1)
        return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()

    def guided(self, model, x, t, y, scale, amp=False):
        """CFG in one batched forward: out = out_null + s (out_cond - out_null); s = 0 unconditional, 1 conditional."""
        tt, null = torch.full((len(y),), t, device=y.device), torch.full_like(y, self.null)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, model, y, scale, sampler="dpm++", steps=20, eta=0.0, gen=None, frames=0, amp=False):
        """Draw len(y) images in [-1, 1] (and up to `frames` snapshots of the reverse process).

        ddpm: ancestral over all T steps (= DDIM with η = 1); ddim: `steps` steps, noise η; dpm++: DPM-Solver++(2M).
        """
        shape = (len(y), model.channels, model.grid * model.patch, model.grid * model.patch)
        x = torch.randn(shape, device=y.device, generator=gen)
        ts = list(range(self.T - 1, -1, -1)) if sampler == "ddpm" else \
            torch.linspace(self.T - 1, 0, steps).round().long().tolist()  # then the clean image
        eta = 1.0 if sampler == "ddpm" else eta
        snaps, every, x0_prev = [x], max(1, len(ts) // frames) if frames else 0, None
        for i, t in enumerate(ts):
            s = ts[i + 1] if i + 1 < len(ts) else -1  # the next step; -1 is the clean image
            a, a_s = self.abar_at(t), self.abar_at(s)
            x0, eps = self.denoise(self.guided(model, x, t, y, scale, amp), x, t)
            if sampler == "dpm++":  # multistep in λ = log(√ᾱ / √(1-ᾱ)) on the data prediction (Lu et al. 2022)
                h = self.lam(a_s) - self.lam(a)
                D = x0
                if x0_prev is not None and s > 0:  # 2nd order: D = (1 + 1/2r) x0_i - 1/2r x0_{i-1}, r = h_{i-1} / h_i
                    r = h_prev / h
                    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
                x = ((1 - a_s) / (1 - a)).sqrt() * x - a_s.sqrt() * torch.expm1(-h) * D  # σ_s/σ_t x - α_s (e^{-h} - 1) D
                x0_prev, h_prev = x0, h
            else:  # DDIM: x_s = √ᾱ_s x0 + √(1-ᾱ_s-σ²) ε + σ z, σ = η √((1-ᾱ_s)/(1-ᾱ_t) (1-ᾱ_t/ᾱ_s))
                sigma = eta * ((1 - a_s) / (1 - a) * (1 - a / a_s)).sqrt()
                noise = torch.randn(shape, device=y.device, generator=gen) if eta > 0 else 0
                x = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise
            if frames and ((i + 1) % every == 0 or i + 1 == len(ts)):
                snaps.append(x)
        return x.clamp(-1, 1), snaps


# ----------------------------------------------------------------------------- training
def save_samples(a, ema, diff, dev, tag, amp):
    """One grid per CFG scale (row = class) and a GIF of the last scale, all in one batched sampling run."""
    classes, n = ema.num_classes, 10
    y = torch.arange(classes, device=dev).repeat_interleave(n).repeat(len(a.cfg_scales))
    scale = torch.tensor(a.cfg_scales, device=dev).repeat_interleave(classes * n).view(-1, 1, 1, 1)
    gen = torch.Generator(dev).manual_seed(a.seed)  # fixed noise: grids are comparable across epochs
    x, snaps = diff.sample(ema, y, scale, a.sampler, a.sample_steps, a.eta, gen, frames=40, amp=amp)
    x = (x + 1) / 2
    for i, s in enumerate(a.cfg_scales):
        save_grid(x[i * classes * n:(i + 1) * classes * n], os.path.join(a.out_dir, f"grid_{tag}_cfg{s:g}.png"), n)
    save_gif([(f[-classes * n:].clamp(-1, 1) + 1) / 2 for f in snaps], os.path.join(a.out_dir, f"denoise_{tag}.gif"), n)


def write_npz(a, ema, diff, dev, amp, chunk=500):
    """samples.npz: num-samples images (x in [0, 1], (N, C, H, W)) with balanced labels y, first CFG scale."""
    y_all = torch.arange(a.num_samples) % ema.num_classes
    gen = torch.Generator(dev).manual_seed(a.seed + 1)
    xs = [diff.sample(ema, y.to(dev), a.cfg_scales[0], a.sampler, a.sample_steps, a.eta, gen, amp=amp)[0]
          for y in y_all.split(chunk)]
    x = ((torch.cat(xs) + 1) / 2).float().cpu().numpy()
    path = os.path.join(a.out_dir, "samples.npz")
    np.savez_compressed(path, x=x, y=y_all.numpy(), cfg_scale=a.cfg_scales[0], sampler=a.sampler,
                        sample_steps=a.timesteps if a.sampler == "ddpm" else a.sample_steps, eta=a.eta)
    print(f"wrote {path}: {len(x)} samples, cfg scale {a.cfg_scales[0]:g}, sampler {a.sampler}")


def train_step(a, net, model, ema, opt, diff, x0, y, step, total):
    """One optimiser step on a batch (x0 in [-1, 1]); returns the loss as a tensor (no host sync)."""
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=a.amp):
        loss = diff.loss(net, x0, y)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, a.lr, a.warmup_steps, total)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip if a.grad_clip > 0 else float("inf"))
    opt.step()
    ema_update(ema, model, step, a.ema_decay)
    return loss.detach()


def train(a, dev, model, ema, opt, diff, ckpt, data, rank=0, world=1):
    """The loop: data on the device as uint8, shuffled per epoch by index, host syncs only to log."""
    x_all, y_all = data[0].to(dev), data[1].to(dev)
    B, N = a.batch_size, len(x_all)
    per_epoch = N // (B * world)  # every rank takes its own B images of the shared permutation
    total = a.epochs * per_epoch
    stop_at = min(total, a.max_steps) if a.max_steps else total
    step, log = (ckpt["step"], ckpt["loss_log"]) if ckpt else (0, [])
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
                         "rng": rng_state(), "loss_log": log}, os.path.join(a.out_dir, "ckpt.pt"))

    say = print if rank == 0 else (lambda *_, **__: None)
    say(f"training {sum(p.numel() for p in model.parameters()) / 1e6:.3g}M params on {N} images, {world} "
        f"process(es) x batch {B}, {per_epoch} steps/epoch, steps {step}..{stop_at} of {total}, {dev}, amp {a.amp}")
    loss_sum, n_sum, t0, s0 = torch.zeros((), device=dev), 0, time.time(), step
    while step < stop_at:
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(a.seed * 1000 + epoch)).to(dev)
        for i in range(i, per_epoch):
            idx = perm[(i * world + rank) * B:(i * world + rank + 1) * B]
            x0 = x_all[idx].float() / 127.5 - 1  # uint8 -> [-1, 1]
            loss_sum += train_step(a, net, model, ema, opt, diff, x0, y_all[idx], step, total)
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
            save_samples(a, ema, diff, dev, f"e{epoch + 1:03d}", a.amp)
        checkpoint()
        t0, s0 = time.time(), step  # img/s and ETA count training only
    if rank == 0:
        save_loss(log, a.out_dir, f"{SCRIPT}: training loss (MSE on eps)")
        if a.num_samples:
            write_npz(a, ema, diff, dev, a.amp)
    say(f"done: {step} steps; outputs in {a.out_dir}")


def run_benchmark(a, dev, model, ema, opt, diff):
    """--benchmark: training steps on random data and one sampling run of 100 guided images; writes nothing."""
    C, S, K = DATA_SHAPES[a.dataset]
    x0, y = torch.rand(a.batch_size, C, S, S, device=dev) * 2 - 1, torch.arange(a.batch_size, device=dev) % K
    net = torch.compile(model) if a.compile else model
    y100 = torch.arange(100, device=dev) % K
    steps = a.sample_steps if a.sampler != "ddpm" else a.timesteps

    def sample_100():
        diff.sample(ema, y100, a.cfg_scales[-1], a.sampler, a.sample_steps, a.eta, amp=a.amp)
        return f"100 samples, cfg {a.cfg_scales[-1]:g}, {a.sampler} {steps} steps"
    benchmark(lambda: train_step(a, net, model, ema, opt, diff, x0, y, a.warmup_steps, 10**9), sample_100,
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
    diff = Diffusion(a.timesteps, a.schedule, a.prediction, a.snr_gamma, a.label_dropout, model.num_classes, dev)
    if a.benchmark:
        return run_benchmark(a, dev, model, ema, opt, diff)
    data = None if a.sample_only else load_dataset(a.dataset, a.data_dir)  # before anything is written
    if data and len(data[0]) < a.batch_size * world:
        raise UsageError(f"--batch-size {a.batch_size} x {world} is larger than the dataset ({len(data[0])} images)")
    if rank == 0:
        if a.sample_only:
            os.makedirs(a.out_dir, exist_ok=True)
        else:
            prepare_out_dir(a.out_dir, a.resume, a.overwrite)
    if a.sample_only:
        save_samples(a, ema, diff, dev, "sample", a.amp)
        if a.num_samples:
            write_npz(a, ema, diff, dev, a.amp)
        print(f"wrote samples to {a.out_dir}")
        return
    train(a, dev, model, ema, opt, diff, ckpt, data, rank, world)
    if world > 1:  # DDP keeps the ranks' weights identical: a checksum each shows it
        print(f"rank {rank} weights checksum {sum(p.double().sum().item() for p in model.parameters()):.12e}")
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        die(e)
