"""The classic DDPM baseline: a UNet (residual blocks, self-attention at low resolution) predicting the noise,
on MNIST, Fashion-MNIST or CIFAR-10; unconditional by default, class-conditional with CFG under --cond.

    python ddpm_unet.py --epochs 20 --device cuda                  # reference config (64 wide, mults 1 2 2), MNIST
    python ddpm_unet.py --base-channels 16 --num-res-blocks 1 --dropout 0 --batch-size 32 --lr 1e-3 \
        --epochs 3 --warmup-steps 100                              # CPU-sized MNIST digits (0.27M params)
    python ddpm_unet.py --dataset cifar10 --base-channels 128 --channel-mults 1 2 2 2 --attn-res 16 \\
        --cond --epochs 200 --device cuda                          # DDPM's CIFAR-10 UNet (35.7M params) + labels
    python ddpm_unet.py --sample-only --ckpt runs/ddpm_unet/ckpt.pt --num-samples 1000 --sampler ddpm --var beta

Writes to --out-dir (default runs/ddpm_unet): per epoch a 10x10 grid of samples (grid_eNNN.png; with --cond
one grid per CFG scale, grid_eNNN_cfgS.png, row = class 0..9), a GIF of the reverse process (denoise_eNNN.gif)
and ckpt.pt; at the end loss.csv and loss.png; with --num-samples N also samples.npz (x in [0, 1], labels y
with --cond) for evaluate.py.

Resolutions: the UNet halves the image once per --channel-mults entry after the first; the input is zero-padded
(and the output cropped) to the next multiple of 2^(levels-1). MNIST with 3 levels runs at 28, 14, 7 unpadded;
4 levels pad 28 to 32. CIFAR-10 runs at 32, 16, 8(, 4). --attn-res names resolutions of that plan.
Guidance (--cond): eps = eps_null + s * (eps_cond - eps_null), so s = 0 is unconditional, s = 1 plain conditional.
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
                    load_checkpoint, load_dataset, lr_at, pick_device, prepare_out_dir, rng_state, save_gif,
                    save_grid, save_loss, seed_everything, set_rng_state, take_recipe, timestep_embedding)

SCRIPT = "ddpm_unet"
DATA_SHAPES = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10)}  # channels, size, classes
HFLIP = {"cifar10"}  # datasets trained with random horizontal flips (never digits)
# the model and training recipe come from the checkpoint on --resume / --sample-only
RECIPE = ["dataset", "base_channels", "channel_mults", "num_res_blocks", "attn_res", "dropout", "cond", "timesteps",
          "batch_size", "lr", "weight_decay", "warmup_steps", "ema_decay", "label_dropout", "grad_clip", "seed"]


# ----------------------------------------------------------------------------- config
def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist | cifar10")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default=f"runs/{SCRIPT}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=int, default=0)
    # model
    p.add_argument("--base-channels", type=int, default=64, help="width of the first level (CIFAR-10: 128)")
    p.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2, 2], help="width multiple per level")
    p.add_argument("--num-res-blocks", type=int, default=2, help="residual blocks per level on the way down")
    p.add_argument("--attn-res", type=int, nargs="*", default=[],
                   help="resolutions with self-attention after each block (the middle always has one)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--cond", action="store_true", help="class-conditional, with label dropout and CFG")
    # diffusion
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability of the null class (--cond)")
    # training
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--resume", default="", help="continue training from this checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out-dir")
    p.add_argument("--benchmark", action="store_true", help="time training steps and sampling on random data")
    # sampling
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", default="")
    p.add_argument("--sampler", default="ddim", help="ddpm (ancestral, all steps) | ddim")
    p.add_argument("--var", default="posterior", help="ddpm variance: posterior (β̃_t) | beta (β_t)")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0,
                   help="DDIM noise: 1 = DDPM posterior on the strided steps, 0 deterministic (noisy grids\n"
                        "from a briefly trained 1000-step model)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="with --cond only")
    p.add_argument("--num-samples", type=int, default=0, help="write samples.npz with this many samples")
    return p


def resolutions(a):
    """The UNet's resolution plan: the padded input size halved once per level after the first."""
    k = 2 ** (len(a.channel_mults) - 1)
    size = -(-DATA_SHAPES[a.dataset][1] // k) * k
    return [size // 2 ** i for i in range(len(a.channel_mults))]


def check_args(a):
    """Every out-of-range flag is a UsageError (one line, exit 2) before anything is written."""
    if a.dataset not in DATA_SHAPES:
        raise UsageError(f"unknown --dataset '{a.dataset}' (choose from {', '.join(DATA_SHAPES)})")
    if a.sampler not in ("ddpm", "ddim"):
        raise UsageError(f"unknown --sampler '{a.sampler}' (choose ddpm or ddim)")
    if a.var not in ("posterior", "beta"):
        raise UsageError(f"unknown --var '{a.var}' (choose posterior or beta)")
    for name in ("base_channels", "num_res_blocks", "timesteps", "epochs", "batch_size", "sample_steps", "log_every"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(a, name)})")
    for name in ("max_steps", "num_samples", "warmup_steps", "weight_decay", "grad_clip", "eta"):
        if getattr(a, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(a, name)})")
    if not (a.lr > 0 and math.isfinite(a.lr)):
        raise UsageError(f"--lr must be a positive number (got {a.lr})")
    if a.base_channels % 4:
        raise UsageError(f"--base-channels must be a multiple of 4 (GroupNorm groups), got {a.base_channels}")
    if min(a.channel_mults) < 1:
        raise UsageError(f"--channel-mults must be integers >= 1 (got {a.channel_mults})")
    plan = resolutions(a)
    if plan[-1] < 2:
        raise UsageError(f"--channel-mults: {len(a.channel_mults)} levels shrink {plan[0]}x{plan[0]} below 2x2")
    if any(r not in plan for r in a.attn_res):
        raise UsageError(f"--attn-res {a.attn_res}: not a resolution of this UNet ({', '.join(map(str, plan))})")
    if not (0 <= a.dropout < 1) or not (0 <= a.label_dropout < 1) or not (0 <= a.ema_decay < 1):
        raise UsageError("--dropout, --label-dropout and --ema-decay must be in [0, 1)")
    if any(not math.isfinite(s) or s < 0 for s in a.cfg_scales):
        raise UsageError(f"--cfg-scales must be finite and >= 0 (got {a.cfg_scales})")
    if a.sampler == "ddim" and a.sample_steps > a.timesteps:
        raise UsageError(f"--sample-steps {a.sample_steps} is above --timesteps {a.timesteps}")


# ----------------------------------------------------------------------------- model
def norm(ch):
    """GroupNorm: 32 groups as in DDPM once there are 4+ channels per group, fewer for narrow nets."""
    return nn.GroupNorm(math.gcd(32, ch // 4), ch)


def zero_(conv):
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (as in DDPM), residual."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv = norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv2d(ch, ch, 1))  # zero: the attention layer starts as the identity

    def forward(self, x):  # (N, C, H, W)
        N, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).view(N, 3, C, H * W).transpose(2, 3).unbind(1)  # 3 x (N, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        return x + self.proj(h.transpose(1, 2).reshape(N, C, H, W))


class ResBlock(nn.Module):
    """norm-SiLU-conv, + embedding of (t, y), norm-SiLU-dropout-conv, + skip; then optional self-attention."""

    def __init__(self, cin, cout, emb_dim, dropout, attn=False):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        # zero last conv: the residual branch adds 0, so each block starts as its skip path (the identity when
        # cin == cout) and the deep net starts shallow; gradients still reach conv2, which opens the branch
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = SelfAttention(cout) if attn else nn.Identity()

    def forward(self, x, emb):  # x (N, Cin, H, W), emb (N, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # per-channel shift from the timestep (and class)
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """DDPM's UNet: down path saving every activation, middle (res, attn, res), up path eating them as skips."""

    def __init__(self, img_size=28, channels=1, base=64, mults=(1, 2, 2), num_res=2, attn_res=(), dropout=0.1,
                 num_classes=0):
        super().__init__()
        k = 2 ** (len(mults) - 1)
        self.img_size, self.size, self.channels, self.base = img_size, -(-img_size // k) * k, channels, base
        self.num_classes, self.cond = num_classes, num_classes > 0  # label `num_classes` is the null class of CFG
        E = 4 * base
        self.t_mlp = nn.Sequential(nn.Linear(base, E), nn.SiLU(), nn.Linear(E, E))
        self.y_embed = nn.Embedding(num_classes + 1, E) if self.cond else None
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down, self.up, chans, ch, res = nn.ModuleList(), nn.ModuleList(), [base], base, self.size
        for i, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(ResBlock(ch, base * m, E, dropout, res in attn_res))
                ch = base * m
                chans.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # (N, C, H/2, W/2)
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, E, dropout, attn=True), ResBlock(ch, ch, E, dropout)])
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):  # one more than down: the strided conv output is a skip too
                self.up.append(ResBlock(ch + chans.pop(), base * m, E, dropout, res in attn_res))
                ch = base * m
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1)))  # 2H, 2W
                res *= 2
        # zero output conv: with the zero-initialised residual branches the untrained UNet predicts exactly ε = 0
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_(nn.Conv2d(ch, channels, 3, padding=1)))

    def embed(self, t, y=None):  # (N,) timestep index, (N,) label or null -> (N, 4*base)
        emb = self.t_mlp(timestep_embedding(t, self.base))
        return emb + self.y_embed(y) if self.cond else emb

    def forward(self, x, t, y=None):  # x (N, C, S, S) -> ε prediction of the same shape
        p = self.size - self.img_size
        x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2))  # zeros up to the plan's size (N, C, size, size)
        emb = self.embed(t, y)
        h = self.conv_in(x)
        skips = [h]
        for blk in self.down:  # ResBlocks take the embedding, the strided convs only h
            h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], 1), emb) if isinstance(blk, ResBlock) else blk(h)
        h = self.out(h)
        return h[:, :, p // 2:p // 2 + self.img_size, p // 2:p // 2 + self.img_size]


def build_model(a):
    channels, size, classes = DATA_SHAPES[a.dataset]
    return UNet(size, channels, a.base_channels, a.channel_mults, a.num_res_blocks, a.attn_res, a.dropout,
                classes if a.cond else 0)


# ----------------------------------------------------------------------------- diffusion
class Diffusion:
    """DDPM with a linear beta schedule and an eps-predicting model."""

    def __init__(self, timesteps, beta_start=1e-4, beta_end=0.02, device="cpu"):
        self.T = timesteps
        betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, dim=0)  # ᾱ_t = Π_{s<=t} (1 - β_s)
        self.betas, self.abar = betas.float().to(device), abar.float().to(device)

    def q_sample(self, x0, t, eps):
        a = self.abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps  # x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε  ~ q(x_t | x0)

    def abar_at(self, t):  # ᾱ_{-1} = 1: the step after t = 0 is the clean image
        return self.abar[t] if t >= 0 else torch.ones((), device=self.abar.device)

    def ddpm_step(self, x, t, eps, noise, var="posterior"):
        """Ancestral step x_t -> x_{t-1} with σ² = β̃_t (posterior) or β_t (beta); no noise on the last step."""
        beta, a, a_prev = self.betas[t], self.abar[t], self.abar_at(t - 1)
        mean = (x - beta / (1 - a).sqrt() * eps) / (1 - beta).sqrt()  # μ = (x_t - β_t/√(1-ᾱ_t) ε) / √α_t
        post = beta * (1 - a_prev) / (1 - a)  # β̃_t = β_t (1-ᾱ_{t-1}) / (1-ᾱ_t), 0 at t = 0
        return mean + (post if var == "posterior" or t == 0 else beta).sqrt() * noise

    def ddim_step(self, x, t, t_prev, eps, eta, noise):
        """DDIM step x_t -> x_{t_prev}; eta = 0 is deterministic, eta = 1 with t_prev = t-1 is DDPM."""
        a, a_prev = self.abar[t], self.abar_at(t_prev)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # x0 predicted from ε
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # σ = η √((1-ᾱ')/(1-ᾱ) (1-ᾱ/ᾱ'))
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise


def guided_eps(model, x, t, y, scale):
    """Unconditional model: ε_θ(x, t). Conditional: CFG in one batched forward, eps_null + s (eps_cond - eps_null)."""
    if not model.cond:
        return model(x, t).float()
    null = torch.full_like(y, model.num_classes)
    eps_cond, eps_null = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).float().chunk(2)
    return eps_null + scale * (eps_cond - eps_null)


@torch.no_grad()
def sample(model, diff, n, y=None, scale=1.0, sampler="ddim", steps=50, eta=1.0, var="posterior", gen=None,
           frames=0, amp=False):
    """Draw n images in [-1, 1] (labels y for a conditional model; `frames` snapshots of the reverse process)."""
    dev = next(model.parameters()).device
    rand = lambda: torch.randn(n, model.channels, model.img_size, model.img_size, device=dev, generator=gen)  # noqa
    x = rand()
    ts = list(range(diff.T - 1, -1, -1)) if sampler == "ddpm" else \
        torch.linspace(diff.T - 1, 0, steps).round().long().tolist()
    snaps, every = [x], max(1, len(ts) // frames) if frames else 0
    for i, t in enumerate(ts):
        tt = torch.full((n,), t, device=dev, dtype=torch.long)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            eps = guided_eps(model, x, tt, y, scale)
        noise = rand() if (sampler == "ddpm" or eta > 0) else torch.zeros_like(x)
        if sampler == "ddpm":
            x = diff.ddpm_step(x, t, eps, noise, var)
        else:
            x = diff.ddim_step(x, t, ts[i + 1] if i + 1 < len(ts) else -1, eps, eta, noise)
        if frames and ((i + 1) % every == 0 or i + 1 == len(ts)):
            snaps.append(x)
    return x.clamp(-1, 1), snaps


# ----------------------------------------------------------------------------- training
def hflip(x):
    """Mirror each image of (N, C, H, W) left-right with probability 1/2 (on the device, one draw per image)."""
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)


def save_samples(a, ema, diff, dev, tag, amp):
    """10x10 samples (conditional: one grid per CFG scale, row = class) and a GIF of the last grid, one batch."""
    n, scale, y = 100, 1.0, None
    if ema.cond:
        y = torch.arange(ema.num_classes, device=dev).repeat_interleave(10).repeat(len(a.cfg_scales))
        scale = torch.tensor(a.cfg_scales, device=dev).repeat_interleave(100).view(-1, 1, 1, 1)
        n = len(y)
    gen = torch.Generator(dev).manual_seed(a.seed)  # fixed noise: grids are comparable across epochs
    x, snaps = sample(ema, diff, n, y, scale, a.sampler, a.sample_steps, a.eta, a.var, gen, frames=40, amp=amp)
    x = (x + 1) / 2
    names = [f"grid_{tag}_cfg{s:g}.png" for s in a.cfg_scales] if ema.cond else [f"grid_{tag}.png"]
    for i, name in enumerate(names):
        save_grid(x[i * 100:(i + 1) * 100], os.path.join(a.out_dir, name), 10)
    save_gif([(f[-100:].clamp(-1, 1) + 1) / 2 for f in snaps], os.path.join(a.out_dir, f"denoise_{tag}.gif"), 10)


def write_npz(a, ema, diff, dev, amp, chunk=500):
    """samples.npz: num-samples images (x in [0, 1], (N, C, H, W)); conditional: balanced labels y, first CFG scale."""
    y_all = torch.arange(a.num_samples) % max(1, ema.num_classes)
    gen = torch.Generator(dev).manual_seed(a.seed + 1)
    xs = [sample(ema, diff, len(y), y.to(dev) if ema.cond else None, a.cfg_scales[0], a.sampler, a.sample_steps,
                 a.eta, a.var, gen, amp=amp)[0] for y in y_all.split(chunk)]
    x = ((torch.cat(xs) + 1) / 2).float().cpu().numpy()
    path = os.path.join(a.out_dir, "samples.npz")
    extra = dict(y=y_all.numpy(), cfg_scale=a.cfg_scales[0]) if ema.cond else {}
    np.savez_compressed(path, x=x, sampler=a.sampler, eta=a.eta,
                        sample_steps=a.timesteps if a.sampler == "ddpm" else a.sample_steps, **extra)
    cfg = f"cfg scale {a.cfg_scales[0]:g}, " if ema.cond else ""
    print(f"wrote {path}: {len(x)} samples, {cfg}sampler {a.sampler}")


def train_step(a, net, model, ema, opt, diff, x0, y, step, total):
    """One optimiser step on a batch (x0 in [-1, 1]); returns the loss as a tensor (no host sync)."""
    if model.cond:
        y = torch.where(torch.rand(len(y), device=y.device) < a.label_dropout, model.num_classes, y)  # CFG dropout
    t = torch.randint(0, diff.T, (len(x0),), device=x0.device)
    eps = torch.randn_like(x0)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=a.amp):
        pred = net(diff.q_sample(x0, t, eps), t, y if model.cond else None)
    loss = F.mse_loss(pred.float(), eps)  # L = E ||ε - ε_θ(x_t, t[, y])||²
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
            x0 = hflip(x0) if a.dataset in HFLIP else x0
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
    """--benchmark: training steps on random data and one sampling run of 100 images; writes nothing."""
    C, S, K = DATA_SHAPES[a.dataset]
    x0, y = torch.rand(a.batch_size, C, S, S, device=dev) * 2 - 1, torch.arange(a.batch_size, device=dev) % K
    net = torch.compile(model) if a.compile else model
    y100 = torch.arange(100, device=dev) % K if model.cond else None
    steps = a.sample_steps if a.sampler == "ddim" else a.timesteps

    def sample_100():
        sample(ema, diff, 100, y100, a.cfg_scales[-1], a.sampler, a.sample_steps, a.eta, a.var, amp=a.amp)
        return f"100 samples, {f'cfg {a.cfg_scales[-1]:g}, ' if model.cond else ''}{a.sampler} {steps} steps"
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
    diff = Diffusion(a.timesteps, device=dev)
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
