"""The classic DDPM baseline: a UNet (residual blocks, self-attention at low resolution) on MNIST, Fashion-MNIST or
CIFAR-10, unconditional or (--cond) class-conditional with CFG, trained and sampled by a Diffusion like dit_ddpm.py's.

    python ddpm_unet.py --quick --device cpu                 # the small CPU recipe (QUICK below)
    python ddpm_unet.py --dataset cifar10 --base-channels 128 --channel-mults 1 2 2 2 --attn-res 16 --cond \\
        --epochs 200 --device cuda                           # DDPM's CIFAR-10 UNet (35.7M params) + labels
    python ddpm_unet.py --resume runs/ddpm_unet/ckpt.pt      # continue a stopped run with all its flags

Writes to --out-dir: per epoch a 10x10 grid (grid_eNNN.png; --cond: one per CFG scale, row = class), a GIF of the
reverse process, ckpt.pt, loss.csv, loss.png; with --num-samples N also samples.npz for evaluate.py.
"""
import argparse
import copy
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import save_samples, timestep_embedding
from harness import (
    built, cfg_scale, claim_out_dir, cli, count, defaults, fraction, leave_group, load_dataset, load_state, nonneg,
    parse_args, Parser, pick_device, positive, Run, seed, size, step_count, UsageError, write_npz,
)

SCRIPT = "ddpm_unet"
DATA = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10), "cifar10": (3, 32, 10)}  # C, S, K
QUICK = dict(  # --quick: under 5 min on 2 CPU cores
    cond=True, base_channels=16, num_res_blocks=1, dropout=0.0,
    batch_size=32, max_steps=2500, lr=2e-3, warmup_steps=100,
    cfg_scales=[1.5],
)

# the flags the weights are trained for: --resume and --sample-only refuse other values
WEIGHTS = ("dataset", "cond", "base_channels", "channel_mults", "num_res_blocks", "attn_res", "timesteps",
           "schedule", "prediction")

# ----------------------------------------------------------------------------- config
def get_parser():
    d = defaults(UNet, Diffusion, Diffusion.sample)  # the classes' defaults are the recipe: the flags take them
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small CPU recipe: " + str(QUICK).replace("%", "%%"))
    p.add_argument("--dataset", default="mnist", choices=DATA,
                   help="cifar10 is trained with horizontal flips")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default=f"runs/{SCRIPT}")
    p.add_argument("--device", default="auto",
                   help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--base-channels", type=size, default=d["base_channels"],
                   help="width of the first level (CIFAR-10: 128)")
    p.add_argument("--channel-mults", type=size, nargs="+", default=list(d["channel_mults"]),
                   help="width multiple per level")
    p.add_argument("--num-res-blocks", type=size, default=d["num_res_blocks"],
                   help="residual blocks per level on the way down")
    p.add_argument("--attn-res", type=size, nargs="*", default=list(d["attn_res"]),
                   help="resolutions with self-attention")
    p.add_argument("--dropout", type=fraction, default=d["dropout"])
    p.add_argument("--cond", action="store_true",
                   help="class-conditional, with label dropout and CFG")
    p.add_argument("--timesteps", type=step_count, default=d["timesteps"])
    p.add_argument("--schedule", default=d["schedule"], choices=["linear", "cosine"],
                   help="noise schedule ᾱ_t")
    p.add_argument("--prediction", default=d["prediction"], choices=["eps", "v", "x0"],
                   help="what the network predicts")
    p.add_argument("--label-dropout", type=fraction, default=d["label_dropout"],
                   help="share of null labels in training (for CFG)")
    p.add_argument("--epochs", type=size, default=20)
    p.add_argument("--max-steps", type=count, default=0,
                   help="run length in steps, the LR schedule spans it (0: --epochs)")
    p.add_argument("--batch-size", type=size, default=128, help="per process")
    p.add_argument("--lr", type=positive, default=2e-4,
                   help="peak; linear warm-up, then cosine decay to 0")
    p.add_argument("--weight-decay", type=nonneg, default=0.0)
    p.add_argument("--warmup-steps", type=count, default=200)
    p.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay, reached after a warm-up")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=size, default=50,
                   help="progress line and loss.csv row every N steps")
    p.add_argument("--resume", default="",
                   help="continue the run of this checkpoint (its flags come with it)")
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", default="")
    p.add_argument("--sampler", default=d["sampler"], choices=["ddpm", "ddim", "dpm++"],
                   help="ddpm: ancestral, all steps")
    p.add_argument("--sample-steps", type=step_count, default=d["steps"],
                   help="model evaluations for ddim and dpm++")
    p.add_argument("--eta", type=nonneg, default=d["eta"],
                   help="DDIM noise: 1 = DDPM posterior, 0 deterministic")
    p.add_argument("--cfg-scales", type=cfg_scale, nargs="+", default=[0.0, 1.0, 3.0],
                   help="0: unconditional")
    p.add_argument("--num-samples", type=count, default=0,
                   help="write samples.npz with this many samples")
    p.add_argument("--sample-cfg", type=cfg_scale, default=1.5, help="the CFG scale of samples.npz (--cond)")
    return p


def check(a):  # the cross-flag checks argparse cannot make
    plan = resolutions(DATA[a.dataset][1], len(a.channel_mults))
    steps_fit = a.sampler == "ddpm" or a.sample_steps <= a.timesteps  # ddpm runs all T steps anyway
    problems = [
        (a.base_channels % 4, "--base-channels must be a multiple of 4 (GroupNorm groups)"),
        (plan[-1] < 2, f"--channel-mults: {len(plan)} levels shrink {plan[0]}x{plan[0]} below 2x2"),
        (set(a.attn_res) - set(plan), f"--attn-res must name resolutions of this UNet {plan}"),
        (not steps_fit, "--sample-steps must be <= --timesteps"),
        (a.sample_only and not a.ckpt, "--sample-only needs --ckpt PATH"),
    ]
    for bad, msg in problems:
        if bad:
            raise UsageError(msg)


# ----------------------------------------------------------------------------- model
def resolutions(size, levels):
    """The UNet's resolution plan: the input zero-padded to a multiple of 2^(levels-1), halved once a level."""
    unit = 2 ** (levels - 1)
    padded = -(-size // unit) * unit  # size rounded up to a multiple of unit
    return [padded // 2 ** i for i in range(levels)]  # MNIST: 28, 14, 7


def norm(ch):
    """GroupNorm: 32 groups as in DDPM once there are 4+ channels per group, fewer for narrow nets."""
    return nn.GroupNorm(math.gcd(32, ch // 4), ch)


def zero_(conv):
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map (as in DDPM), residual; proj starts at 0."""
    def __init__(self, ch):
        super().__init__()
        self.norm = norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x):  # (N, C, H, W)
        N, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).view(N, 3, C, H * W).transpose(2, 3)  # (N, 3, HW, C)
        q, k, v = qkv.unbind(1)  # 3 x (N, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √C) v
        return x + self.proj(h.transpose(1, 2).reshape(N, C, H, W))


class ResBlock(nn.Module):
    """norm-SiLU-conv, + embedding of (t, y), norm-SiLU-dropout-conv, + skip; then optional self-attention."""
    def __init__(self, cin, cout, emb_dim, dropout, attn=False):
        super().__init__()
        self.norm1 = norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, cout)
        self.norm2 = norm(cout)
        self.drop = nn.Dropout(dropout)
        # zero last conv: the residual branch adds 0, so each block starts as its skip path (the
        # identity when cin == cout) and the deep net starts shallow; gradients still reach conv2,
        # which opens the branch
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = SelfAttention(cout) if attn else nn.Identity()

    def forward(self, x, emb):  # x (N, Cin, H, W), emb (N, E)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # + a shift per channel
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """DDPM's UNet: down path saving every activation, middle (res, attn, res), up path eating them as skips.
    num_classes 0: unconditional. The defaults are the script's recipe."""
    def __init__(self, img_size, channels, num_classes=0, base_channels=64, channel_mults=(1, 2, 2),
                 num_res_blocks=2, attn_res=(), dropout=0.1):
        super().__init__()
        base, mults, num_res = base_channels, channel_mults, num_res_blocks
        self.img_size = img_size
        self.channels = channels
        self.base = base
        self.size = resolutions(img_size, len(mults))[0]  # the padded input size
        self.num_classes = num_classes  # y_embed's last row is the null label's (y = -1)
        self.cond = num_classes > 0
        E = 4 * base  # embedding width
        self.t_mlp = nn.Sequential(nn.Linear(base, E), nn.SiLU(), nn.Linear(E, E))
        self.y_embed = nn.Embedding(num_classes + 1, E) if self.cond else None
        self.conv_in = nn.Conv2d(channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        chans = [base]  # the channels of every saved activation, for the up path's skips
        ch = base
        res = self.size
        for i, m in enumerate(mults):
            for _ in range(num_res):
                self.down.append(ResBlock(ch, base * m, E, dropout, res in attn_res))
                ch = base * m
                chans.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # (N, C, H/2, W/2)
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList([
            ResBlock(ch, ch, E, dropout, attn=True),
            ResBlock(ch, ch, E, dropout),
        ])
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(num_res + 1):  # one more than down: the strided conv's output is a skip
                self.up.append(ResBlock(ch + chans.pop(), base * m, E, dropout, res in attn_res))
                ch = base * m
            if i > 0:
                conv = nn.Conv2d(ch, ch, 3, padding=1)
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2), conv))  # (N, C, 2H, 2W)
                res *= 2
        # zero output conv: with the zero-initialised residual branches the untrained UNet predicts
        # exactly ε = 0
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_(nn.Conv2d(ch, channels, 3, padding=1)))

    def embed(self, t, y=None):  # (N,) timestep index, (N,) label or -1 (null) -> (N, 4*base)
        emb = self.t_mlp(timestep_embedding(t, self.base))
        return emb + self.y_embed(torch.where(y < 0, self.num_classes, y)) if self.cond else emb

    def forward(self, x, t, y=None):  # x (N, C, S, S) -> ε prediction of the same shape
        p = self.size - self.img_size
        lo, hi = p // 2, p - p // 2  # the zero padding before and after, on each side
        x = F.pad(x, (lo, hi, lo, hi))  # zeros up to the plan's size (N, C, size, size)
        h = self.conv_in(x)
        emb = self.embed(t, y)
        skips = [h]
        for blk in self.down:  # ResBlocks take the embedding, the strided convs only h
            h = blk(h, emb) if isinstance(blk, ResBlock) else blk(h)
            skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for blk in self.up:
            h = blk(torch.cat([h, skips.pop()], 1), emb) if isinstance(blk, ResBlock) else blk(h)
        return self.out(h)[:, :, lo:lo + self.img_size, lo:lo + self.img_size]  # crop the padding


# ----------------------------------------------------------------------------- diffusion
class Diffusion:
    """Discrete-time Gaussian diffusion: noise schedule, training loss, and DDPM / DDIM / DPM-Solver++ with CFG.
    Label -1 is the null label: training drops labels to it, guidance contrasts with it. Defaults: the recipe."""
    def __init__(self, timesteps=1000, schedule="cosine", prediction="v", label_dropout=0.1,
                 cfg_interval=(0.0, math.inf)):
        self.T = timesteps
        self.prediction = prediction
        self.label_dropout = label_dropout
        self.cfg_interval = cfg_interval
        if schedule == "linear":  # β_t from 1e-4 to 0.02 at T = 1000 (DDPM), scaled by 1000/T: ᾱ_T ≈ 4e-5 at any T
            k = 1000 / timesteps
            betas = torch.linspace(1e-4 * k, 0.02 * k, timesteps, dtype=torch.float64)
        else:  # cosine: ᾱ(s) = cos²((s + 0.008)/1.008 · π/2), s = t/T, ends at ᾱ_T ≈ 0 (pure noise)
            s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
            f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = 1 - f[1:] / f[:-1]
        self.abar = torch.cumprod(1 - betas.clamp(max=0.999), dim=0).float()  # ᾱ_t = Π_{s<=t} (1 - β_s)

    def loss(self, model, x0, y):
        """E_t,ε ||target - model(x_t, t, y)||², t uniform, labels dropped to null for CFG; x0 in [-1, 1]."""
        self.abar = self.abar.to(x0.device)  # the schedule on the data's device
        y = torch.where(torch.rand(len(y), device=y.device) < self.label_dropout, -1, y)
        t = torch.randint(0, self.T, (len(y),), device=y.device)
        eps = torch.randn_like(x0)
        ab = self.abar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # x_t = √ᾱ x0 + √(1-ᾱ) ε  ~ q(x_t | x0)
        if self.prediction == "v":
            target = ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v = √ᾱ ε - √(1-ᾱ) x0
        else:
            target = eps if self.prediction == "eps" else x0
        return ((model(xt, t, y).float() - target) ** 2).mean((1, 2, 3)).mean()  # per image, then over the batch

    def denoise(self, out, x, t):
        """Model output at step t -> (x0, ε) estimates, x0 clipped to the data range [-1, 1]."""
        ab = self.abar[t]
        if self.prediction == "eps":
            x0 = (x - (1 - ab).sqrt() * out) / ab.sqrt()  # x0 = (x - √(1-ᾱ) ε) / √ᾱ
        elif self.prediction == "v":
            x0 = ab.sqrt() * x - (1 - ab).sqrt() * out  # x0 = √ᾱ x - √(1-ᾱ) v
        else:
            x0 = out
        x0 = x0.clamp(-1, 1)
        return x0, (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # ε = (x - √ᾱ x0) / √(1-ᾱ)

    def guided(self, model, x, t, y, scale, amp=False):
        """CFG in one batched forward: out = out_null + s (out_cond - out_null); s = 0 unconditional, 1 conditional,
        None: one forward, no guidance (an unconditional model). Scales above 1 act only where σ lies in cfg_interval,
        elsewhere s = 1 (Kynkäänniemi et al. 2024): guided at pure noise, every sample starts from its class's
        extrapolated mean and the samples lose their variety."""
        tt = torch.full((len(x),), t, device=x.device)
        lo, hi = self.cfg_interval
        sigma = ((1 - self.abar[t]) / self.abar[t]).sqrt().item()  # σ = √((1-ᾱ)/ᾱ), noise over signal
        if scale is not None and not lo < sigma <= hi:
            scale = torch.as_tensor(scale).clamp(max=1.0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            if scale is None:
                return model(x, tt, y).float()
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, -1)]))
        cond, uncond = out.float().chunk(2)
        return uncond + scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, model, shape, y, scale, sampler="ddim", steps=20, eta=1.0, gen=None, frames=0, amp=False):
        """Draw images of `shape` (N, C, H, W) in [-1, 1] for labels y (N,) on y's device, and up to `frames` snapshots
        of the reverse process. ddpm: ancestral over all T steps (= DDIM with η = 1); ddim: `steps` steps, noise η;
        dpm++: DPM-Solver++(2M)."""
        self.abar = self.abar.to(y.device)
        x = torch.randn(shape, device=y.device, generator=gen)
        if sampler == "ddpm":  # every step T-1, ..., 0, with η = 1
            steps, eta = self.T, 1.0
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist() + [-1]  # the steps, then the clean image
        snaps = [x]
        every = max(1, steps // frames) if frames else 0
        x0_prev = h_prev = None  # DPM-Solver++: the previous step's x0 estimate and step size
        for i, (t, s) in enumerate(zip(ts, ts[1:])):  # from step t to the next one, s
            ab = self.abar[t]
            ab_s = self.abar[s] if s >= 0 else torch.ones((), device=x.device)  # ᾱ_{-1} = 1: the clean image
            x0, eps = self.denoise(self.guided(model, x, t, y, scale, amp), x, t)
            if sampler == "dpm++":  # multistep in λ = log(√ᾱ / √(1-ᾱ)) on the data prediction (Lu et al. 2022)
                h = 0.5 * (torch.log(ab_s / (1 - ab_s)) - torch.log(ab / (1 - ab)))  # λ_s - λ_t, +∞ into s = -1
                # 1st order on the first step and on the last two, into step 0 and into the clean image (s = -1):
                # second order into step 0 measured worse
                D = x0
                if x0_prev is not None and s > 0:  # 2nd order: D = (1 + 1/2r) x0_i - 1/2r x0_{i-1}
                    r = h_prev / h
                    D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
                # x_s = σ_s/σ_t x_t - α_s (e^-h - 1) D, with σ = √(1-ᾱ) and α = √ᾱ
                x = ((1 - ab_s) / (1 - ab)).sqrt() * x - ab_s.sqrt() * torch.expm1(-h) * D
                x0_prev = x0
                h_prev = h
            else:  # DDIM: x_s = √ᾱ_s x0 + √(1-ᾱ_s-σ²) ε + σ z, σ = η √((1-ᾱ_s)/(1-ᾱ_t) (1-ᾱ_t/ᾱ_s))
                sigma = eta * ((1 - ab_s) / (1 - ab) * (1 - ab / ab_s)).sqrt()
                noise = torch.randn(shape, device=y.device, generator=gen) if eta > 0 else 0
                x = ab_s.sqrt() * x0 + (1 - ab_s - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise
            if frames and ((i + 1) % every == 0 or s < 0):
                snaps.append(x)
        return x.clamp(-1, 1), snaps


# ----------------------------------------------------------------------------- training
def outputs(a, obj, ema, dev, tag, npz=False):
    """One sampling: a grid per CFG scale and the GIF (tag e001, ... or sample); with npz also samples.npz."""
    C, S, K = DATA[a.dataset]

    def draw(y, scale, gen, frames=0):
        return obj.sample(ema, (len(y), C, S, S), y, scale, a.sampler, a.sample_steps, a.eta, gen, frames, a.amp)
    if tag:  # unconditional: one grid, no guidance
        save_samples(draw, dev, K, a.cfg_scales if a.cond else None, a.out_dir, tag, a.seed)
    if npz and a.num_samples:
        ddpm = a.sampler == "ddpm"  # ancestral: all T steps, η = 1
        write_npz(draw, dev, a.num_samples, K * a.cond, a.sample_cfg if a.cond else None, a.out_dir, a.seed,
                  sampler=a.sampler, sample_steps=a.timesteps if ddpm else a.sample_steps, eta=1.0 if ddpm else a.eta)


def train(a, model, ema, opt, obj, data, ckpt, dev, rank=0, world=1):
    """The training loop, each step whole: a batch, the learning rate, the loss, backward, clipping, the optimiser
    step and the EMA. `run` (harness.py) keeps the books: the shuffle, the progress line, Ctrl-C, and at each epoch's
    end the checkpoint and the grids. Data stays on the device as uint8; the host syncs only to log."""
    x_all, y_all = (t.to(dev) for t in data)
    run = Run(a, SCRIPT, model, ema, opt, len(x_all), ckpt, dev, rank, world, partial(outputs, a, obj, ema, dev))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if a.compile else net
    warmup = min(a.warmup_steps, run.total // 2)  # at most half the run, so that every run decays
    for idx in run.batches():  # this process's indices of the step's batch
        x = x_all[idx].float() / 127.5 - 1  # uint8 -> [-1, 1]
        if a.dataset == "cifar10":  # random horizontal flips
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=dev) < 0.5, x.flip(3), x)
        step = run.step
        if step < warmup:  # learning rate: linear warm-up, then cosine decay to 0 at the run's last step
            lr = a.lr * (step + 1) / warmup
        else:
            lr = a.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (run.total - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.amp):
            loss = obj.loss(net, x, y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # EMA of the weights; its decay grows as (1+step)/(10+step), so short runs average too
            for e, w in zip(ema.parameters(), model.parameters()):
                e.lerp_(w, 1 - min(a.ema_decay, (1 + step) / (10 + step)))  # e += (1 - decay) (w - e)
        run.log(loss.detach())  # the step is done: a progress line every --log-every steps
    return run.end()


def build(a, dev):
    """The model, its EMA copy, the optimiser and the objective for these flags."""
    C, S, K = DATA[a.dataset]
    model = UNet(S, C, K * a.cond, a.base_channels, a.channel_mults, a.num_res_blocks, a.attn_res, a.dropout).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, fused=dev.type == "cuda")
    obj = Diffusion(a.timesteps, a.schedule, a.prediction, a.label_dropout)
    return model, copy.deepcopy(model).requires_grad_(False).eval(), opt, obj


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a, ckpt = parse_args(get_parser, argv, QUICK, SCRIPT, WEIGHTS)  # --resume PATH alone: that run's flags
    check(a)
    rank, world, dev = pick_device(a.device)  # under torchrun: this process's rank and GPU
    a.amp = dev.type == "cuda" if a.amp is None else a.amp
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    model, ema, opt, obj = built(build, a, dev)  # or one line if it does not fit in memory
    if ckpt:  # weights; for --resume also the optimiser and the RNG
        load_state(ckpt, a.resume or a.ckpt, model, ema, opt if a.resume else None)
    if world > 1:  # each rank draws its own noise (so a DDP resume is not bit-exact)
        torch.manual_seed(a.seed + 1000 * rank + (ckpt["step"] if a.resume else 0))
    data = None if a.sample_only else load_dataset(a.dataset, a.data_dir, DATA[a.dataset], a.batch_size * world)
    if rank == 0:
        claim_out_dir(a)
    halted = False
    if not a.sample_only:
        halted = train(a, model, ema, opt, obj, data, ckpt if a.resume else None, dev, rank, world)
    leave_group(world)  # under torchrun every rank leaves together
    if rank == 0 and not halted:  # rank 0 alone writes the last outputs
        outputs(a, obj, ema, dev, "sample" if a.sample_only else None, npz=True)
        print(f"done; outputs in {a.out_dir}")


if __name__ == "__main__":
    raise SystemExit(cli(main))
