"""Class-conditional Diffusion Transformer (DiT: conv stem, patch tokens, adaLN-Zero) trained as a Gaussian
diffusion on MNIST and sampled with classifier-free guidance (CFG) by DDPM (ancestral), DDIM or DPM-Solver++(2M).

    python dit_ddpm.py --quick --device cpu                  # the small CPU recipe (QUICK below)
    torchrun --nproc_per_node=4 dit_ddpm.py --device cuda    # reference config (384 wide, 12 deep) on 4 GPUs
    python dit_ddpm.py --resume runs/dit_ddpm/ckpt.pt        # continue a stopped run with all its flags
    python dit_ddpm.py --sample-only --ckpt runs/dit_ddpm/ckpt.pt --num-samples 1000 --sample-cfg 3

Writes to --out-dir: per epoch one grid per CFG scale (grid_eNNN_cfgS.png, row = class) and a GIF of the reverse
process (denoise_eNNN.gif), ckpt.pt, loss.csv and loss.png; with --num-samples N also samples.npz for evaluate.py.
"""
import argparse
import copy
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import pos_embed_2d, save_samples, timestep_embedding
from harness import (
    built, cfg_scale, claim_out_dir, cli, count, defaults, fraction, leave_group, load_dataset, load_state, nonneg,
    parse_args, Parser, pick_device, positive, Run, seed, size, step_count, UsageError, write_npz,
)

SCRIPT = "dit_ddpm"
DATA = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10)}  # dataset: channels, size, classes
# --quick: the small CPU recipe (about 5.5 min on 2 CPU cores; the README has the times and scores)
QUICK = dict(hidden_size=96, depth=4, num_heads=4, patch_size=4, batch_size=32, max_steps=3700, lr=2e-3,
             warmup_steps=100, cfg_scales=[1.85], sample_cfg=1.85)

# the flags the weights are trained for: --resume and --sample-only refuse other values
WEIGHTS = ("dataset", "patch_size", "hidden_size", "depth", "num_heads", "stem_channels", "out_conv", "timesteps",
           "schedule", "prediction")

# ----------------------------------------------------------------------------- config
def get_parser():
    d = defaults(DiT, Diffusion, Diffusion.sample)  # the classes' defaults are the recipe: the flags take them
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU recipe: " + str(QUICK).replace("%", "%%"))
    p.add_argument("--dataset", default="mnist", choices=DATA)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out-dir", default=f"runs/{SCRIPT}")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--hidden-size", type=size, default=d["hidden_size"])
    p.add_argument("--depth", type=size, default=d["depth"])
    p.add_argument("--num-heads", type=size, default=d["num_heads"])
    p.add_argument("--patch-size", type=size, default=d["patch_size"])
    p.add_argument("--stem-channels", type=count, default=d["stem_channels"],
                   help="two 3x3 convs of this width before patchify (0: none)")
    p.add_argument("--out-conv", action=argparse.BooleanOptionalAction, default=d["out_conv"],
                   help="a zero-initialised residual 3x3 conv after unpatchify")
    p.add_argument("--timesteps", type=step_count, default=d["timesteps"])
    p.add_argument("--schedule", default=d["schedule"], choices=["linear", "cosine"], help="noise schedule ᾱ_t")
    p.add_argument("--prediction", default=d["prediction"], choices=["eps", "v", "x0"], help="the network's target")
    p.add_argument("--label-dropout", type=fraction, default=d["label_dropout"],
                   help="share of null labels in training (for CFG)")
    p.add_argument("--epochs", type=size, default=10)
    p.add_argument("--max-steps", type=count, default=0,
                   help="run length in steps, the LR schedule spans it (0: --epochs)")
    p.add_argument("--batch-size", type=size, default=128, help="per process")
    p.add_argument("--lr", type=positive, default=3e-4, help="peak; linear warm-up, then cosine decay to 0")
    p.add_argument("--weight-decay", type=nonneg, default=0.0)
    p.add_argument("--warmup-steps", type=count, default=200)
    p.add_argument("--beta2", type=fraction, default=0.999, help="AdamW's second-moment decay")
    p.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay, reached after a warm-up")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=size, default=50, help="progress line and loss.csv row every N steps")
    p.add_argument("--resume", default="", help="continue the run of this checkpoint (its flags come with it)")
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", default="")
    p.add_argument("--sampler", default=d["sampler"], choices=["ddpm", "ddim", "dpm++"],
                   help="ddpm: ancestral, all steps")
    p.add_argument("--sample-steps", type=step_count, default=d["steps"], help="model evaluations for ddim and dpm++")
    p.add_argument("--eta", type=nonneg, default=d["eta"], help="DDIM noise: 0 deterministic, 1 = DDPM posterior")
    p.add_argument("--cfg-scales", type=cfg_scale, nargs="+", default=[0.0, 1.0, 3.0], help="0: unconditional")
    p.add_argument("--num-samples", type=count, default=0, help="write samples.npz with this many samples")
    p.add_argument("--sample-cfg", type=cfg_scale, default=1.5, help="the CFG scale of samples.npz")
    p.add_argument("--cfg-interval", type=nonneg, nargs=2, default=list(d["cfg_interval"]), metavar=("LO", "HI"),
                   help="scales above 1 only at noise levels σ = √((1-ᾱ)/ᾱ) in (LO, HI] (0 1e9: at every step)")
    return p


def check(a):
    """The cross-flag checks argparse cannot make."""
    image_size = DATA[a.dataset][1]
    if a.hidden_size % math.lcm(4, a.num_heads):
        raise UsageError("--hidden-size must be a multiple of 4 and of --num-heads")
    if image_size % a.patch_size:
        raise UsageError(f"--patch-size must divide {image_size}, the image size")
    if a.sampler != "ddpm" and a.sample_steps > a.timesteps:
        raise UsageError("--sample-steps must be <= --timesteps")
    if a.sample_only and not a.ckpt:
        raise UsageError("--sample-only needs --ckpt PATH")
    if a.cfg_interval[0] >= a.cfg_interval[1]:
        raise UsageError("--cfg-interval LO HI needs LO < HI")


# ----------------------------------------------------------------------------- model
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # (N, T, D) with per-sample (N, D)


class Attention(nn.Module):
    """Multi-head self-attention written out: one qkv projection, a split into heads, softmax(QKᵀ/√d)V, a projection."""
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # q, k and v for every head in one matmul
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # x (N, T, D)
        N, T, D = x.shape
        qkv = self.qkv(x).view(N, T, 3, self.heads, D // self.heads)  # (N, T, 3, H, D/H)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (N, H, T, D/H)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / √(D/H)) v, (N, H, T, D/H)
        out = out.transpose(1, 2).reshape(N, T, D)  # the heads side by side again
        return self.proj(out)


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
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class DiT(nn.Module):
    """Conv stem -> patchify -> + fixed 2-D position table -> adaLN-Zero blocks conditioned on (t, y) -> unpatchify ->
    a zero-initialised residual 3x3 conv. The defaults are the script's (reference) recipe."""
    def __init__(self, img_size, channels, num_classes, patch_size=2, hidden_size=384, depth=12, num_heads=6,
                 mlp_ratio=4.0, stem_channels=32, out_conv=True, freq_dim=256):
        super().__init__()
        if hidden_size % math.lcm(4, num_heads) or img_size % patch_size:  # the 2-D table: 4 channels a frequency
            raise ValueError("hidden_size must be a multiple of 4 and of num_heads, and patch_size divide img_size")
        D, p = hidden_size, patch_size
        self.channels = channels
        self.patch = p
        self.grid = img_size // p  # tokens per side
        self.freq_dim = freq_dim
        self.num_classes = num_classes  # y_embed's last row is the null label's (y = -1)
        # stem: two 3x3 convs at full resolution see the pixels around each patch's edge before it becomes a token
        self.stem = nn.Identity()
        if stem_channels:
            self.stem = nn.Sequential(nn.Conv2d(channels, stem_channels, 3, padding=1), nn.GELU(),
                                      nn.Conv2d(stem_channels, stem_channels, 3, padding=1), nn.GELU())
        self.patch_embed = nn.Conv2d(stem_channels or channels, D, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", pos_embed_2d(D, self.grid)[None], persistent=False)  # (1, T, D)
        self.t_mlp = nn.Sequential(nn.Linear(freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embed = nn.Embedding(num_classes + 1, D)  # one extra row: the null label
        self.blocks = nn.ModuleList(DiTBlock(D, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))  # shift, scale
        self.final = nn.Linear(D, p * p * channels)  # each token -> its patch's pixels
        self.out_conv = nn.Conv2d(channels, channels, 3, padding=1) if out_conv else None  # smooths patch seams
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(D, -1))  # like a Linear on the flattened patch
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for m in self.t_mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        # adaLN-Zero: the modulation layers and the output layer start at zero, so every block is the
        # identity (gates = 0) and the untrained network outputs exactly 0; training opens the gates.
        # The output conv starts at zero too: a residual that begins as the identity.
        zero = [*(blk.adaLN[-1] for blk in self.blocks), self.final_adaLN[-1], self.final]
        for m in zero + ([self.out_conv] if out_conv else []):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):  # (N, T, p*p*C) -> (N, C, H, W)
        N, g, p, C = x.shape[0], self.grid, self.patch, self.channels
        x = x.view(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p): row of patches, row in patch
        return x.reshape(N, C, g * p, g * p)

    def forward(self, x, t, y):  # x (N, C, H, W), t (N,) timestep index, y (N,) label, -1: the null label
        x = self.patch_embed(self.stem(x))  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        y = torch.where(y < 0, self.num_classes, y)  # the null label's row
        c = self.t_mlp(timestep_embedding(t, self.freq_dim)) + self.y_embed(y)  # (N, D)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final(modulate(self.final_norm(x), shift, scale))  # (N, T, p*p*C)
        x = self.unpatchify(x)  # (N, C, H, W)
        return x + self.out_conv(x) if self.out_conv else x


# ----------------------------------------------------------------------------- diffusion
class Diffusion:
    """Discrete-time Gaussian diffusion: noise schedule, training loss, and DDPM / DDIM / DPM-Solver++ with CFG.
    Label -1 is the null label: training drops labels to it, guidance contrasts with it. Defaults: the recipe."""
    def __init__(self, timesteps=400, schedule="cosine", prediction="x0", label_dropout=0.05, cfg_interval=(0.3, 6.0)):
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
    def sample(self, model, shape, y, scale, sampler="dpm++", steps=10, eta=0.0, gen=None, frames=0, amp=False):
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
    if tag:
        save_samples(draw, dev, K, a.cfg_scales, a.out_dir, tag, a.seed)
    if npz and a.num_samples:
        ddpm = a.sampler == "ddpm"  # ancestral: all T steps, η = 1
        write_npz(draw, dev, a.num_samples, K, a.sample_cfg, a.out_dir, a.seed, sampler=a.sampler,
                  sample_steps=a.timesteps if ddpm else a.sample_steps, eta=1.0 if ddpm else a.eta,
                  cfg_interval=a.cfg_interval)


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
    model = DiT(S, C, K, a.patch_size, a.hidden_size, a.depth, a.num_heads, stem_channels=a.stem_channels,
                out_conv=a.out_conv).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, a.beta2), weight_decay=a.weight_decay,
                            fused=dev.type == "cuda")
    obj = Diffusion(a.timesteps, a.schedule, a.prediction, a.label_dropout, a.cfg_interval)
    return model, copy.deepcopy(model).requires_grad_(False).eval(), opt, obj


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a, ckpt = parse_args(get_parser, argv, QUICK, SCRIPT, WEIGHTS)  # --resume PATH alone: every flag of that run
    check(a)
    rank, world, dev = pick_device(a.device)  # under torchrun: this process's rank and GPU
    a.amp = dev.type == "cuda" if a.amp is None else a.amp
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    model, ema, opt, obj = built(build, a, dev)  # or one line if it does not fit in memory
    if ckpt:  # weights; for --resume also the optimiser and the RNG
        load_state(ckpt, a.resume or a.ckpt, model, ema, opt if a.resume else None)
    if world > 1:  # each rank draws its own noise (so a DDP resume is not bit-exact)
        torch.manual_seed(a.seed + 1000 * rank + (ckpt["step"] if a.resume else 0))
    data = None
    if not a.sample_only:  # the whole split, checked against DATA[dataset] before anything is written
        data = load_dataset(a.dataset, a.data_dir, DATA[a.dataset], a.batch_size * world)
    if rank == 0:
        claim_out_dir(a)
    halted = False
    if not a.sample_only:
        halted = train(a, model, ema, opt, obj, data, ckpt if a.resume else None, dev, rank, world)
    leave_group(world)  # under torchrun every rank leaves together; rank 0 alone writes the last outputs
    if rank == 0 and not halted:
        outputs(a, obj, ema, dev, "sample" if a.sample_only else None, npz=True)
        print(f"done; outputs in {a.out_dir}")


if __name__ == "__main__":
    raise SystemExit(cli(main))
