"""Speed of any script's training step and sampler on random data, and for dit_ddpm.py a side-by-side comparison with a
reference-article-style implementation. Writes nothing.

    python bench.py dit_ddpm --device cuda --batch-size 1024 --compile   # the script's own flags follow its name
    python bench.py ddpm_unet --quick --device cpu
    python bench.py dit_ddpm --compare --device cpu --batch-size 64     # ours vs the reference style, ~5 min on 2 cores
    python bench.py dit_ddpm --quick --compare-attention --device cpu  # written-out attention vs nn.MultiheadAttention

Prints img/s, step time, GFLOP per image (counted by torch), TFLOP/s, MFU against the GPU's dense bf16 peak, peak
memory, and the time of 100 guided samples. The reference style is what most DiT-on-MNIST write-ups do: timm-style
blocks (attention as explicit softmax(QKᵀ/√d)V), fp32, a DataLoader over float tensors, `.item()` every step, and a
400-step ancestral sampler running the conditional and the unconditional model as two forward passes per step (timed
over --ref-sample-steps steps and scaled to 400). Same model sizes and parameter count as dit_ddpm.py.

Bad input is one line on stderr, `error: ...`, and exit code 2, never a traceback, and comes before any model is built:
a missing or unknown script, --steps or --ref-sample-steps below 1, --compare with --compare-attention, --compare for
other than dit_ddpm, --compare-attention for ddpm_unet (no DiT blocks), and whatever the script's own parser and its
cross-flag checks refuse (an unknown flag, --hidden-size not a multiple of --num-heads, ...).
"""
import importlib
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from harness import Parser, UsageError, cli, parse_args, pick_device, size

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense


def train_step(a, net, opt, obj, x, y):
    """One optimiser step as the scripts' loops take it (loss, backward, clipping, the step), without the books."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=a.amp):
        loss = obj.loss(net, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.detach()


def timed(fn, n, sync, warmup=1):
    """Mean seconds of fn() over n calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t0) / n


# ----------------------------------------------------------------------------- the reference-style DiT
class RefAttention(nn.Module):
    """timm-style attention with the softmax written out."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # 1/√d of a head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (N, T, D)
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (N, H, T, D/H)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (N, H, T, T)
        return self.proj((attn @ v).transpose(1, 2).reshape(N, T, D))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, modulate):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.modulate = modulate
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(self.modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(self.modulate(self.norm2(x), s2, sc2))


def compare(a, mod, ours, ema, opt, obj, dev, sync, steps, ref_sample_steps):
    """dit_ddpm.py's train step and its sampler (--sampler, --sample-steps) against the reference style, same sizes."""
    ref = mod.DiT(28, 1, 10, a.patch_size, a.hidden_size, a.depth, a.num_heads, stem_channels=a.stem_channels,
                  out_conv=a.out_conv).to(dev)
    ref.blocks = nn.ModuleList(RefBlock(a.hidden_size, a.num_heads, mod.modulate) for _ in range(a.depth)).to(dev)
    B = a.batch_size
    T = 400  # the reference's number of diffusion steps
    betas = torch.linspace(1e-4, 0.02, T, device=dev)  # the reference's own linear schedule
    abar = torch.cumprod(1 - betas, 0)
    images = torch.rand(4 * B, 1, 28, 28) * 2 - 1
    labels = torch.arange(4 * B) % 10
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=B, shuffle=True)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-4)
    batches = iter(())

    def ref_step():  # DataLoader, fp32, .item() every step
        nonlocal batches
        batch = next(batches, None)
        if batch is None:  # the loader is used up: another epoch
            batches = iter(loader)
            batch = next(batches)
        x0, y = batch
        x0 = x0.to(dev)
        y = torch.where(torch.rand(B) < 0.1, 10, y).to(dev)  # 10% null labels
        t = torch.randint(0, T, (B,), device=dev)
        eps = torch.randn_like(x0)
        ab = abar[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        loss = F.mse_loss(ref(xt, t, y), eps)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return loss.item()

    x, y = images[:B].to(dev), labels[:B].to(dev)
    t_ref = timed(ref_step, steps, sync)
    t_ours = timed(lambda: train_step(a, ours, opt, obj, x, y), steps, sync)
    n_params = sum(q.numel() for q in ref.parameters())
    print(f"{n_params / 1e6:.3g}M params (both), batch {B}, device {dev}")
    print(f"train step   reference {t_ref:.3g} s ({B / t_ref:.0f} img/s)   ours {t_ours:.3g} s ({B / t_ours:.0f} img/s)"
          f"   ours/reference speed {t_ref / t_ours:.3g}x")
    y100 = torch.arange(100, device=dev) % 10
    xs = torch.randn(100, 1, 28, 28, device=dev)

    @torch.no_grad()
    def ref_sample_step(t=T - 1):  # two forward passes, then the ancestral update
        tt = torch.full((100,), t, device=dev)
        e_c, e_u = ref(xs, tt, y100), ref(xs, tt, torch.full_like(y100, 10))
        eps = e_u + 3.0 * (e_c - e_u)
        mean = (xs - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
        return mean + (betas[t] * (1 - abar[t - 1]) / (1 - abar[t])).sqrt() * torch.randn_like(xs)
    t_ref = timed(ref_sample_step, ref_sample_steps, sync) * T
    t_ours = timed(lambda: obj.sample(ema, xs.shape, y100, 3.0, a.sampler, a.sample_steps, amp=a.amp), 1, sync,
                   warmup=0)
    print(f"100 samples  reference DDPM-400, 2 passes/step {t_ref:.3g} s (timed {ref_sample_steps} steps)   ours "
          f"{a.sampler} {a.sample_steps} steps, batched CFG {t_ours:.3g} s   speed-up {t_ref / t_ours:.3g}x")


# ----------------------------------------------------------------------------- attention: written out or fused
class FusedAttention(nn.Module):
    """torch's nn.MultiheadAttention behind the DiT's Attention interface: the same maths in one module."""

    def __init__(self, dim, heads):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):  # (N, T, D)
        return self.mha(x, x, x, need_weights=False)[0]


def compare_attention(a, mod, dev, sync, steps, rounds=3):
    """Train-step time of the DiT with its written-out Attention and with nn.MultiheadAttention, timed in turns."""
    C, S, K = mod.DATA[a.dataset]
    x = torch.rand(a.batch_size, C, S, S, device=dev) * 2 - 1
    y = torch.arange(a.batch_size, device=dev) % K
    runs = {}
    for name in ("written out", "nn.MultiheadAttention"):
        torch.manual_seed(a.seed)
        model, _, _, obj = mod.build(a, dev)
        if name != "written out":
            for blk in model.blocks:
                blk.attn = FusedAttention(a.hidden_size, a.num_heads).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
        runs[name] = (model, opt, obj)
    times = {name: [] for name in runs}
    for _ in range(rounds):  # in turns, so that a change in the machine's load falls on both
        for name, (model, opt, obj) in runs.items():
            times[name].append(timed(lambda: train_step(a, model, opt, obj, x, y), steps, sync))
    best = {name: min(t) for name, t in times.items()}
    for name, t in best.items():
        print(f"attention {name:<22} train step {t * 1e3:.4g} ms ({a.batch_size / t:.0f} img/s), best of {rounds}")
    print(f"written out / nn.MultiheadAttention speed: {best['nn.MultiheadAttention'] / best['written out']:.3g}x")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("script", choices=["dit_ddpm", "dit_flow", "ddpm_unet"])
    p.add_argument("--steps", type=size, default=20, help="timed training steps")
    one = p.add_mutually_exclusive_group()
    one.add_argument("--compare", action="store_true", help="dit_ddpm only: against the reference style")
    one.add_argument("--compare-attention", action="store_true",
                     help="DiTs: the written-out attention against nn.MultiheadAttention")
    p.add_argument("--ref-sample-steps", type=size, default=20, help="timed steps of the reference's 400-step sampler")
    b, rest = p.parse_known_args(argv)
    if b.compare and b.script != "dit_ddpm":
        raise UsageError(f"--compare is for dit_ddpm only, not {b.script}")
    if b.compare_attention and b.script == "ddpm_unet":
        raise UsageError("--compare-attention is for dit_ddpm and dit_flow only: ddpm_unet has no DiT blocks")
    mod = importlib.import_module(b.script)
    a = parse_args(mod.get_parser, rest, mod.QUICK, mod.SCRIPT)[0]
    mod.check(a)  # the script's cross-flag checks: its model is built from these flags
    dev = pick_device(a.device)[2]
    a.amp = dev.type == "cuda" if a.amp is None else a.amp
    torch.manual_seed(a.seed)
    model, ema, opt, obj = mod.build(a, dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if b.compare_attention:
        return compare_attention(a, mod, dev, sync, b.steps)
    if b.compare:
        return compare(a, mod, model, ema, opt, obj, dev, sync, b.steps, b.ref_sample_steps)
    C, S, K = mod.DATA[a.dataset]
    x = torch.rand(a.batch_size, C, S, S, device=dev) * 2 - 1
    y = torch.arange(a.batch_size, device=dev) % K
    net = torch.compile(model) if a.compile else model

    def step():
        return train_step(a, net, opt, obj, x, y)
    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()  # forward + backward of one step
    dt = timed(step, b.steps, sync, warmup=5)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if dev.type == "cuda":
        mem = torch.cuda.max_memory_allocated(dev) / 2**30
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    mfu = f"{flops / dt / peak:.1%} of bf16 peak" if peak else "n/a"
    print(f"{b.script} on {name}: batch {a.batch_size}, step {dt * 1e3:.3g} ms, {a.batch_size / dt:.4g} img/s, "
          f"{flops / a.batch_size / 1e9:.3g} GFLOP/img, {flops / dt / 1e12:.3g} TFLOP/s, "
          f"MFU {mfu}, peak memory {mem:.3g} GiB")
    y100 = torch.arange(100, device=dev) % K
    scale = a.cfg_scales[-1] if getattr(a, "cond", True) else None  # an unconditional UNet: no guidance
    t = timed(lambda: obj.sample(ema, (100, C, S, S), y100, scale, a.sampler, a.sample_steps, amp=a.amp), 1, sync)
    guidance = f"cfg {scale:g}" if scale is not None else "unconditional"
    print(f"100 samples, {guidance}, {a.sampler} {a.sample_steps} steps: {t:.3g} s")


if __name__ == "__main__":
    raise SystemExit(cli(main))
