"""Class-conditional Diffusion Transformer (DiT: conv stem, patch tokens, adaLN-Zero) trained with flow matching
(straight path from noise to data; the network predicts the data or the velocity) on synthetic class patterns or
MNIST; classifier-free guidance (CFG), Euler or Heun sampling.

    python dit_flow.py --quick --device cpu                  # the small CPU recipe (QUICK below)
    torchrun --nproc_per_node=4 dit_flow.py --device cuda    # reference config (256 wide, 6 deep) on 4 GPUs
    python dit_flow.py --resume runs/dit_flow/ckpt.pt        # continue a stopped run with all its flags
    python dit_flow.py --sample-only --ckpt runs/dit_flow/ckpt.pt --sampler heun --sample-steps 5 --num-samples 400

Writes to --out-dir: per epoch a grid per CFG scale (grid_eNNN_cfgS.png, row = class; patterns: channel 0), a GIF,
ckpt.pt, loss.csv, loss.png; with --num-samples N also samples.npz. On patterns also compare_TAG.png (row 1 real, row 2
generated, 4 channels side by side) and metrics.csv (class match to the nearest template, RMS to the requested one).
"""
import argparse
import copy
import math
import os
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import atomic_write, pos_embed_2d, save_image, save_samples, timestep_embedding, to_image
from harness import (
    built, cfg_scale, claim_out_dir, cli, count, defaults, fraction, leave_group, load_dataset, load_state, nonneg,
    parse_args, Parser, pick_device, positive, Run, seed, size, step_count, UsageError, write_npz,
)

SCRIPT = "dit_flow"
DATA = {"patterns": (4, 32, 4), "mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10)}  # dataset: channels, size, classes
# --quick: the small CPU recipe on MNIST (about 5.5 min on 2 CPU cores; the README has the times and scores)
QUICK = dict(dataset="mnist", hidden_size=96, depth=4, num_heads=4, patch_size=4, batch_size=32, max_steps=3000,
             lr=2e-3, warmup_steps=100, cfg_scales=[2.1], sample_cfg=2.1)

# the flags the weights are trained for: --resume and --sample-only refuse other values
WEIGHTS = ("dataset", "patch_size", "hidden_size", "depth", "num_heads", "stem_channels", "out_conv", "prediction")

# ----------------------------------------------------------------------------- config
def get_parser():
    d = defaults(DiT, Flow, Flow.sample)  # the classes' defaults are the recipe: the flags take them
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small CPU recipe: " + str(QUICK).replace("%", "%%"))
    p.add_argument("--dataset", default="patterns", choices=DATA, help="patterns: synthetic, 4 classes, 32x32x4")
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
    p.add_argument("--t-sampling", default=d["t_sampling"], choices=["uniform", "logit-normal"],
                   help="training times t")
    p.add_argument("--prediction", default=d["prediction"], choices=["v", "x1"],
                   help="the network's target: the velocity or the data")
    p.add_argument("--label-dropout", type=fraction, default=d["label_dropout"],
                   help="share of null labels in training (for CFG)")
    p.add_argument("--epochs", type=size, default=50)
    p.add_argument("--max-steps", type=count, default=0,
                   help="run length in steps, the LR schedule spans it (0: --epochs)")
    p.add_argument("--batch-size", type=size, default=64, help="per process")
    p.add_argument("--lr", type=positive, default=1e-4, help="peak; linear warm-up, then cosine decay to 0")
    p.add_argument("--weight-decay", type=nonneg, default=1e-4)
    p.add_argument("--warmup-steps", type=count, default=0)
    p.add_argument("--beta2", type=fraction, default=0.999, help="AdamW's second-moment decay")
    p.add_argument("--ema-decay", type=fraction, default=0.9999, help="EMA decay, reached after a warm-up")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--log-every", type=size, default=50, help="progress line and loss.csv row every N steps")
    p.add_argument("--resume", default="", help="continue the run of this checkpoint (its flags come with it)")
    p.add_argument("--sample-only", action="store_true", help="only sample from --ckpt")
    p.add_argument("--ckpt", default="")
    p.add_argument("--sampler", default=d["sampler"], choices=["euler", "heun"],
                   help="heun: 2nd order, last step Euler")
    p.add_argument("--sample-steps", type=step_count, default=d["steps"], help="integration steps from t = 0 to 1")
    p.add_argument("--cfg-scales", type=cfg_scale, nargs="+", default=[0.0, 1.0, 3.0], help="0: unconditional")
    p.add_argument("--num-samples", type=count, default=0, help="write samples.npz with this many samples")
    p.add_argument("--sample-cfg", type=cfg_scale, default=1.5, help="the CFG scale of samples.npz")
    p.add_argument("--cfg-interval", type=nonneg, nargs=2, default=list(d["cfg_interval"]), metavar=("LO", "HI"),
                   help="scales above 1 only at noise levels σ = (1-t)/t in (LO, HI] (0 1e9: at every step)")
    return p


def check(a):
    """The cross-flag checks argparse cannot make."""
    image_size = DATA[a.dataset][1]
    if a.hidden_size % math.lcm(4, a.num_heads):
        raise UsageError("--hidden-size must be a multiple of 4 and of --num-heads")
    if image_size % a.patch_size:
        raise UsageError(f"--patch-size must divide {image_size}, the image size")
    if a.sample_only and not a.ckpt:
        raise UsageError("--sample-only needs --ckpt PATH")
    if a.cfg_interval[0] >= a.cfg_interval[1]:
        raise UsageError("--cfg-interval LO HI needs LO < HI")


# ----------------------------------------------------------------------------- data: synthetic patterns
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


def make_patterns(seed, n=2000):
    """The synthetic set: n samples, balanced labels (i % 4), Gaussian noise σ = 0.05, deterministic from seed."""
    y = torch.arange(n) % 4
    noise = torch.randn((n, 4, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return normalise(pattern_templates()[y] + 0.05 * noise).float(), y


def template_scores(x, y):
    """Share of samples whose nearest template is their class y, and the mean RMS error to the template of y."""
    rms = (x.float().cpu()[:, None] - TEMPLATES).pow(2).mean(dim=(2, 3, 4)).sqrt()  # (N, 4): to every template
    return (rms.argmin(1) == y.cpu()).float().mean().item(), rms[torch.arange(len(y)), y.cpu()].mean().item()


def viewable(x, all_channels=False):
    """(N, C, H, W) in [-1, 1] -> gray images in [0, 1]: channel 0, or all channels side by side."""
    x = torch.nn.functional.pad((x.float().clamp(-1, 1) + 1) / 2, (0, 1), value=1)  # a white line after each channel
    x = x.permute(0, 2, 1, 3).reshape(len(x), 1, x.shape[2], -1) if all_channels else x[:, :1]  # (N, 1, H, C (W+1))
    return x[..., :-1]


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
    def __init__(self, img_size, channels, num_classes, patch_size=2, hidden_size=256, depth=6, num_heads=8,
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

    def forward(self, x, t, y):  # x (N, C, H, W), t (N,) time in [0, 1], y (N,) label, -1: the null label
        x = self.patch_embed(self.stem(x))  # (N, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        y = torch.where(y < 0, self.num_classes, y)  # the null label's row
        # t is embedded as 1000 t: with raw t in [0, 1], the sin-cos periods of up to 10000 would leave most
        # frequencies nearly constant; 1000 t spans them like DDPM's integer timesteps do.
        c = self.t_mlp(timestep_embedding(1000 * t, self.freq_dim)) + self.y_embed(y)  # (N, D)
        for blk in self.blocks:
            x = blk(x, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=1)
        x = self.final(modulate(self.final_norm(x), shift, scale))  # (N, T, p*p*C)
        x = self.unpatchify(x)  # (N, C, H, W)
        return x + self.out_conv(x) if self.out_conv else x


# ----------------------------------------------------------------------------- flow matching
class Flow:
    """Flow matching on the straight path from noise x0 (t = 0) to data x1 (t = 1); Euler / Heun sampling with CFG.
    Label -1 is the null label: training drops labels to it, guidance contrasts with it. Defaults: the recipe."""
    def __init__(self, t_sampling="logit-normal", prediction="x1", label_dropout=0.1, cfg_interval=(0.3, 6.0)):
        self.t_sampling = t_sampling
        self.prediction = prediction
        self.label_dropout = label_dropout
        self.cfg_interval = cfg_interval

    def sample_t(self, n, device):  # uniform, or logit-normal t = sigmoid(u), u ~ N(0, 1) (more weight mid-path: SD3)
        if self.t_sampling == "logit-normal":
            return torch.sigmoid(torch.randn(n, device=device))
        return torch.rand(n, device=device)

    def loss(self, model, x1, y):
        """E_t,x0 ||target - model(x_t, t, y)||², target v or x1 (in x1 units v weighs t by 1/(1-t)², x1 evenly),
        labels dropped to null for CFG; data x1 in [-1, 1], noise x0 ~ N(0, I)."""
        y = torch.where(torch.rand(len(y), device=y.device) < self.label_dropout, -1, y)
        t = self.sample_t(len(y), y.device)
        x0 = torch.randn_like(x1)
        tt = t.view(-1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * x1  # x_t = (1-t) x0 + t x1
        target = x1 - x0 if self.prediction == "v" else x1  # v = dx_t/dt = x1 - x0
        return ((model(xt, t, y).float() - target) ** 2).mean()

    def guided(self, model, x, t, y, scale, amp=False):
        """CFG in one batched forward: out = out_null + s (out_cond - out_null), then the velocity; x1 is clipped.
        s = 0 unconditional, 1 conditional, None: one forward, no guidance. Scales above 1 act only where σ lies in
        cfg_interval, elsewhere s = 1 (Kynkäänniemi et al. 2024): guided at pure noise, every sample starts from its
        class's extrapolated mean and the samples lose their variety."""
        tt = torch.full((len(x),), t, device=x.device)
        lo, hi = self.cfg_interval
        sigma = (1 - t) / t if t > 0 else math.inf  # x_t / t = x1 + σ x0: noise over signal
        if scale is not None and not lo < sigma <= hi:
            scale = torch.as_tensor(scale).clamp(max=1.0)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            if scale is None:  # one forward, no guidance
                out = model(x, tt, y).float()
            else:
                both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, -1)]))
                cond, uncond = both.float().chunk(2)
                out = uncond + scale * (cond - uncond)
        if self.prediction == "v":
            return out
        return (out.clamp(-1, 1) - x) / (1 - t)  # v = (x1 - x_t) / (1 - t), t < 1

    @torch.no_grad()
    def sample(self, model, shape, y, scale, sampler="euler", steps=20, gen=None, frames=0, amp=False):
        """Draw images of `shape` (N, C, H, W) in [-1, 1] for labels y (N,) on y's device from noise at t = 0, and up
        to `frames` snapshots of the trajectory."""
        x = torch.randn(shape, device=y.device, generator=gen)
        x, snaps = self.integrate(lambda x, t: self.guided(model, x, t, y, scale, amp), x, steps, sampler, frames)
        return x.clamp(-1, 1), snaps

    @staticmethod
    def integrate(velocity, x, steps, method="euler", frames=0):
        """Solve dx/dt = velocity(x, t) from t = 0 to 1 in equal steps -> x(1), up to `frames` snapshots. Heun's last
        step is Euler (as in EDM): v at t = 1 says nothing about the path; one O(dt²) local error keeps order 2."""
        ts = torch.linspace(0, 1, steps + 1, dtype=torch.float64).tolist()
        snaps, every = [x], max(1, steps // frames) if frames else 0
        for i in range(steps):
            dt = ts[i + 1] - ts[i]
            v = velocity(x, ts[i])
            if method == "heun" and i + 1 < steps:  # v = (v(x, t) + v(x + dt v, t + dt)) / 2: trapezoid, O(dt²)
                v = (v + velocity(x + dt * v, ts[i + 1])) / 2
            x = x + dt * v  # Euler: x_{t+dt} = x_t + dt v, error O(dt)
            if frames and ((i + 1) % every == 0 or i + 1 == steps):
                snaps.append(x)
        return x, snaps


# ----------------------------------------------------------------------------- training
def outputs(a, obj, ema, dev, tag, npz=False):
    """One sampling: grids, the GIF and (npz) samples.npz; on patterns also compare_TAG.png and the template scores."""
    C, S, K = DATA[a.dataset]

    def draw(y, scale, gen, frames=0):
        return obj.sample(ema, (len(y), C, S, S), y, scale, a.sampler, a.sample_steps, gen, frames, a.amp)
    sets = []
    if tag:
        x, y = save_samples(draw, dev, K, a.cfg_scales, a.out_dir, tag, a.seed, viewable)
        sets = [(f"{tag} cfg {s:g}", x[i * K * 10:(i + 1) * K * 10], y[:K * 10]) for i, s in enumerate(a.cfg_scales)]
        if a.dataset == "patterns":  # row 1 real, row 2 the first sample of each class at the last scale
            real_and_ours = torch.cat([make_patterns(a.seed, K)[0].to(dev), x[-K * 10::10]])
            save_image(to_image(viewable(real_and_ours, True), K), f"{a.out_dir}/compare_{tag}.png")
    if npz and a.num_samples:
        sets += [("samples.npz", *write_npz(draw, dev, a.num_samples, K, a.sample_cfg, a.out_dir, a.seed,
                                            sampler=a.sampler, sample_steps=a.sample_steps,
                                            cfg_interval=a.cfg_interval))]
    for what, x, y in sets if a.dataset == "patterns" else []:  # printed, and a row of metrics.csv
        row = [what, len(x), a.sampler, a.sample_steps, *template_scores(x, y)]
        print("{}: {} samples, {} {} steps: class match {:.1%}, RMS to template {:.4f}".format(*row))
        path = f"{a.out_dir}/metrics.csv"
        rows = open(path).read() if os.path.isfile(path) else "what,n,sampler,sample_steps,class_match,rms\n"
        atomic_write(path, lambda f: f.write((rows + ",".join(map(str, row)) + "\n").encode()))


def train(a, model, ema, opt, obj, data, ckpt, dev, rank=0, world=1):
    """The training loop, each step whole: a batch, the learning rate, the loss, backward, clipping, the optimiser
    step and the EMA. `run` (harness.py) keeps the books: the shuffle, the progress line, Ctrl-C, and at each epoch's
    end the checkpoint and the grids. Data stays on the device (uint8, or the float patterns); the host syncs
    only to log."""
    x_all, y_all = (t.to(dev) for t in data)
    run = Run(a, SCRIPT, model, ema, opt, len(x_all), ckpt, dev, rank, world, partial(outputs, a, obj, ema, dev))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if a.compile else net
    warmup = min(a.warmup_steps, run.total // 2)  # at most half the run, so that every run decays
    for idx in run.batches():  # this process's indices of the step's batch
        x = x_all[idx].float() / 127.5 - 1 if x_all.dtype == torch.uint8 else x_all[idx]  # -> [-1, 1]
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
    obj = Flow(a.t_sampling, a.prediction, a.label_dropout, a.cfg_interval)
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
    if a.dataset == "patterns" and not a.sample_only:
        data = make_patterns(a.seed)
    elif not a.sample_only:  # the whole split, checked against DATA[dataset] before anything is written
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
