"""Side-by-side speed check: dit_ddpm.py against a reference-article-style implementation, in one run.

    python bench_reference.py --device cpu                 # default DiT config, batch 64, 2 CPU cores: ~5 min
    python bench_reference.py --device cuda --batch-size 256

The reference style is what most DiT-on-MNIST write-ups do: timm-style blocks (attention as explicit
softmax(QKᵀ/√d)V, separate MLP module), fp32, a torch DataLoader over float tensors, `.item()` every step,
and a 400-step ancestral sampler that runs the conditional and the unconditional model as two forward
passes per step. Same model sizes and parameter count as dit_ddpm.py. The reference sampler is timed over
--ref-sample-steps steps and scaled linearly to 400 (every step costs the same).
"""
import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit_ddpm
from common import pick_device


# ----------------------------------------------------------------------------- the reference-style model
class RefAttention(nn.Module):
    """timm-style attention with the softmax written out."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):  # (N, T, D)
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (N, H, T, T)
        return self.proj((attn @ v).transpose(1, 2).reshape(N, T, D))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.mlp = RefAttention(dim, heads), RefMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(dit_ddpm.modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(dit_ddpm.modulate(self.norm2(x), s2, sc2))


class RefDiT(dit_ddpm.DiT):
    """dit_ddpm.DiT with the reference-style blocks swapped in (same sizes and parameter count)."""

    def __init__(self, dim, depth, heads):
        super().__init__(dim=dim, depth=depth, heads=heads)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))


# ----------------------------------------------------------------------------- the two implementations
def time_it(fn, n, warmup=1):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main():
    p = argparse.ArgumentParser(description="dit_ddpm.py vs a reference-style implementation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=384)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--ref-sample-steps", type=int, default=20, help="timed steps of the 400-step sampler")
    a = p.parse_args()
    dev = pick_device(a.device)
    torch.manual_seed(0)
    B, T = a.batch_size, 400
    diff = dit_ddpm.Diffusion(T, device=dev)
    betas = torch.linspace(1e-4, 0.02, T, device=dev)  # the reference's own linear schedule
    abar = torch.cumprod(1 - betas, 0)
    images, labels = torch.rand(4 * B, 1, 28, 28) * 2 - 1, torch.arange(4 * B) % 10

    # reference: DataLoader over float tensors, fp32, Adam, .item() every step
    ref = RefDiT(a.hidden_size, a.depth, a.num_heads).to(dev)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=B, shuffle=True)
    batches = iter(())

    def ref_step():
        nonlocal batches
        try:
            x0, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x0, y = next(batches)
        x0, y = x0.to(dev), y.to(dev)
        y = torch.where(torch.rand(B, device=dev) < 0.1, 10, y)
        t = torch.randint(0, T, (B,), device=dev)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(ref(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, y), eps)
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        return loss.item()

    # ours: dit_ddpm.train_step on a device-resident batch (EMA, clipping and LR schedule included)
    args = dit_ddpm.get_parser().parse_args(["--batch-size", str(B), "--hidden-size", str(a.hidden_size),
                                             "--depth", str(a.depth), "--num-heads", str(a.num_heads)])
    args.amp = dev.type == "cuda"
    ours = dit_ddpm.build_model(args).to(dev)
    ema = dit_ddpm.build_model(args).to(dev).requires_grad_(False)
    opt = torch.optim.AdamW(ours.parameters(), lr=args.lr, fused=dev.type == "cuda")
    x_dev, y_dev = images[:B].to(dev), labels[:B].to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def our_step():
        dit_ddpm.train_step(args, ours, ours, ema, opt, diff, x_dev, y_dev, 1000, 10**6)
        sync()

    print(f"{sum(q.numel() for q in ref.parameters()) / 1e6:.3g}M params (both), batch {B}, device {dev}")
    t_ref, t_ours = time_it(ref_step, a.train_steps), time_it(our_step, a.train_steps)
    print(f"train step   reference {t_ref:.3f} s ({B / t_ref:.0f} img/s)   ours {t_ours:.3f} s ({B / t_ours:.0f} img/s)"
          f"   ours/reference speed {t_ref / t_ours:.2f}x")

    y100 = torch.arange(100, device=dev) % 10
    with torch.no_grad():  # reference sampler: 400 ancestral steps, two forward passes each
        x = torch.randn(100, 1, 28, 28, device=dev)
        null = torch.full_like(y100, 10)

        def ref_sample_step(t=T - 1):
            tt = torch.full((100,), t, device=dev)
            e_c, e_u = ref(x, tt, y100), ref(x, tt, null)
            eps = e_u + 3.0 * (e_c - e_u)
            mean = (x - betas[t] / (1 - abar[t]).sqrt() * eps) / (1 - betas[t]).sqrt()
            mean + (betas[t] * (1 - abar[t - 1]) / (1 - abar[t])).sqrt() * torch.randn_like(x)
            sync()
        t_ref_sample = time_it(ref_sample_step, a.ref_sample_steps) * T
    t0 = time.perf_counter()
    diff.sample(ema, y100, 3.0, "ddim", 50, amp=args.amp)
    sync()
    t_our_sample = time.perf_counter() - t0
    print(f"100 samples  reference DDPM-400, 2 passes/step {t_ref_sample:.1f} s (timed {a.ref_sample_steps} steps)"
          f"   ours DDIM-50, batched CFG {t_our_sample:.1f} s   speed-up {t_ref_sample / t_our_sample:.1f}x")


if __name__ == "__main__":
    main()
