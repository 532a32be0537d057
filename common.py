"""Small helpers shared by every script in this repo (copy this file along with any one script).

Timestep / position embeddings, dataset loading into one uint8 tensor, image grids, GIFs, the
loss plot, atomic checkpoints, device and seed helpers, and `die` (one clear line, exit code 2).
Nothing here knows about a particular model or objective.
"""
import argparse
import math
import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------- errors, device, seed
class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UsageError (one line, exit code 2) instead of the usage text."""

    def error(self, message):
        raise UsageError(message)


def die(msg):
    """Print one clear line to stderr and exit with code 2 (bad input, never a traceback)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def pick_device(name):
    """'auto' -> cuda, then mps, then cpu; an explicit device that is missing is a UsageError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UsageError(f"--device {name}: CUDA is not available on this machine (try --device cpu)")
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {name}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    return dev


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every RNG state that training draws from, for an exact resume."""
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ----------------------------------------------------------------------------- embeddings
def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (N,) float timesteps -> (N, dim): [cos(t*f_i), sin(t*f_i)], f_i = max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos position table (grid*grid, dim): half the channels encode the row, half the column."""
    assert dim % 4 == 0, "2-D sin-cos position embedding needs dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    emb_r = timestep_embedding(rows.flatten(), dim // 2)  # (T, D/2)
    emb_c = timestep_embedding(cols.flatten(), dim // 2)  # (T, D/2)
    return torch.cat([emb_r, emb_c], dim=1)  # (T, D)


# ----------------------------------------------------------------------------- data
DATASETS = {  # name -> (torchvision class name, folder under --data-dir, files torchvision looks for)
    "mnist": ("MNIST", "MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                     "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                                                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", ["data_batch_1", "...", "data_batch_5", "test_batch",
                                                   "batches.meta"]),
}


def load_dataset(name, data_dir, train=True):
    """Whole split as (uint8 images (N, C, H, W), int64 labels (N,)) through torchvision's own loaders.

    Downloads when the files are missing and the network allows; otherwise a UsageError naming the
    folder and the files to place there.
    """
    import torchvision  # imported here so scripts that never load data start faster

    if name not in DATASETS:
        raise UsageError(f"unknown dataset '{name}' (choose from {', '.join(DATASETS)})")
    cls_name, sub, files = DATASETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    if name == "cifar10":  # torchvision md5-checks every batch; accept any copy in the right layout
        cls = type("CIFAR10", (cls,), {"meta": {**cls.meta, "md5": None}, "_check_integrity": lambda self: all(
            os.path.isfile(os.path.join(self.root, self.base_folder, f[0])) for f in self.train_list + self.test_list)})
    try:
        ds = cls(root=data_dir, train=train, download=True)
    except Exception as e:  # offline (URLError), a half-written file, ...
        folder = os.path.join(data_dir, sub)
        raise UsageError(f"{name} not found in {folder} and could not be downloaded ({type(e).__name__}): "
                         f"connect to the network or place {', '.join(files)} in {folder}")
    x = torch.as_tensor(np.asarray(ds.data))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)


# ----------------------------------------------------------------------------- images, GIFs, plots
def to_uint8_grid(x, nrow, pad=2):
    """(N, C, H, W) floats in [0, 1] -> (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) uint8 grid, filled row by row."""
    x = x.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def _pil(arr, scale):
    img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(x, path, nrow, scale=2):
    """Save (N, C, H, W) images in [0, 1] as one PNG grid with `nrow` images per row."""
    _pil(to_uint8_grid(x, nrow), scale).save(path)


def save_gif(frames, path, nrow, scale=2, duration_ms=60):
    """Save a list of (N, C, H, W) batches in [0, 1] as an animated GIF (one grid per frame, last frame held)."""
    imgs = [_pil(to_uint8_grid(f, nrow), scale) for f in frames]
    durations = [duration_ms] * (len(imgs) - 1) + [1500]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=durations, loop=0)


def save_loss_plot(steps, losses, path, title="training loss", size=(640, 400)):
    """Line plot of loss vs step on a log-scale y axis, drawn with pillow (no matplotlib)."""
    w, h, m = size[0], size[1], 50
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((m, 10), title, fill="black")
    d.rectangle([m, m, w - m // 2, h - m], outline="black")
    pts = [(s, v) for s, v in zip(steps, losses) if v > 0 and math.isfinite(v)]
    if len(pts) >= 2:
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        lo, hi = math.log10(min(v for _, v in pts)), math.log10(max(v for _, v in pts))
        hi = hi if hi > lo else lo + 1e-3
        px = lambda s: m + (s - s0) / (s1 - s0) * (w - 1.5 * m)  # noqa: E731
        py = lambda v: h - m - (math.log10(v) - lo) / (hi - lo) * (h - 2 * m)  # noqa: E731
        d.line([(px(s), py(v)) for s, v in pts], fill=(31, 119, 180), width=2)
        for v in (10 ** hi, 10 ** lo):
            d.text((4, py(v) - 6), f"{v:.3g}", fill="black")
        d.text((m, h - m + 6), str(s0), fill="black")
        d.text((w - m - 20, h - m + 6), f"step {s1}", fill="black")
    img.save(path)


# ----------------------------------------------------------------------------- runs: output folder, several GPUs
OUTPUTS = ("ckpt.pt", "loss.csv", "loss.png", "samples.npz", "grid_*.png", "denoise_*.gif", "compare_*.png",
           "*.eval.json", "metrics*.csv")


def prepare_out_dir(out_dir, resume="", overwrite=False):
    """Refuse to mix two runs' outputs: a folder holding another run needs --resume of its ckpt or --overwrite."""
    import glob
    for f in glob.glob(os.path.join(out_dir, "ckpt.pt.tmp*")):  # left by a run killed mid-save
        os.remove(f)
    old = sorted(f for pat in OUTPUTS for f in glob.glob(os.path.join(out_dir, pat)))
    ckpt = os.path.join(out_dir, "ckpt.pt")
    if old and not overwrite and not (resume and os.path.abspath(resume) == os.path.abspath(ckpt)):
        raise UsageError(f"--out-dir {out_dir} already holds a run ({os.path.basename(old[0])}, ...): continue it "
                         f"with --resume {ckpt}, replace it with --overwrite, or choose another --out-dir")
    if overwrite and not resume:
        for f in old:
            os.remove(f)
    os.makedirs(out_dir, exist_ok=True)


def init_distributed(dev):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPU, gloo on CPU. Returns (rank, world, dev)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, dev
    import torch.distributed as dist
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), world, dev


def any_rank(flag, world, dev):
    """True on every rank when `flag` is true on any rank (a no-op for a single process)."""
    if world == 1:
        return bool(flag)
    import torch.distributed as dist
    t = torch.tensor([float(bool(flag))], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ----------------------------------------------------------------------------- benchmark
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense


def benchmark(train_step, sample_fn, batch, dev, steps=20, warmup=5):
    """Time `train_step()` (one optimiser step on `batch` images) and `sample_fn()`; print img/s, memory, MFU."""
    from torch.utils.flop_counter import FlopCounterMode
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as fc:
        train_step()
    flops = fc.get_total_flops()  # forward + backward of one step, counted by torch
    for _ in range(warmup):
        train_step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else \
        __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20
    print(f"benchmark on {name}: batch {batch}, step {dt * 1e3:.3g} ms, {batch / dt:.4g} img/s, "
          f"{flops / batch / 1e9:.3g} GFLOP/img, {flops / dt / 1e12:.3g} TFLOP/s, "
          f"MFU {f'{flops / dt / peak:.1%} of bf16 peak' if peak else 'n/a'}, peak memory {mem:.3g} GiB")
    sample_fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    what = sample_fn()
    sync()
    print(f"benchmark sampling: {what} in {time.perf_counter() - t0:.3g} s")
    return batch / dt


# ----------------------------------------------------------------------------- training helpers
def lr_at(step, lr, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@torch.no_grad()
def ema_update(ema, model, step, decay):
    """EMA with warm-up: the decay grows as (1+step)/(10+step) up to `decay`, so short runs still average."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - d)  # e <- d*e + (1-d)*m


def save_loss(log, out_dir, title):
    """loss.csv (step, mean loss since the previous row) and loss.png."""
    with open(os.path.join(out_dir, "loss.csv"), "w") as f:
        f.write("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log))
    save_loss_plot([s for s, _ in log], [v for _, v in log], os.path.join(out_dir, "loss.png"), title)


def take_recipe(a, ckpt, path, parser, keys):
    """Set args `keys` (model sizes, training recipe) from a checkpoint; a flag given that contradicts it is an error."""
    for k in keys:
        mine, theirs = getattr(a, k), ckpt["args"][k]
        if mine != parser.get_default(k) and mine != theirs:
            raise UsageError(f"checkpoint {path} has --{k.replace('_', '-')} {theirs}, but this command asks for {mine}")
        setattr(a, k, theirs)


# ----------------------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: a crash mid-save keeps the old file."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, script):
    """Load a checkpoint written by `script`; any problem is a UsageError saying which file and why."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e)[:80]})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "args" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a checkpoint of this repo")
    if ckpt.get("script") != script:
        raise UsageError(f"checkpoint {path} was written by {ckpt.get('script', 'another program')}.py, "
                         f"not {script}.py")
    return ckpt


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
