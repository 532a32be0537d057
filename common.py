"""What the scripts share: one-line errors and flag types, device, embeddings, data, images, training, checkpoints."""
import argparse, contextlib, math, os, signal, sys, time  # noqa: E401

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------- errors, flags, device
class UsageError(Exception):
    """Bad input (exit code 2) or a fault while running (code 1): one line on stderr, no traceback (see cli)."""
    def __init__(self, msg, code=2):
        super().__init__(msg)
        self.code = code

class Parser(argparse.ArgumentParser):
    def error(self, message):  # a bad flag is one line, not the usage text
        raise UsageError(message)

def ranged(kind, lo, hi=math.inf, strict=False):
    """argparse type: a `kind` number >= lo (> lo if strict) and < hi; NaN is refused."""
    def parse(s):
        if not (lo < kind(s) if strict else lo <= kind(s)) or not kind(s) < hi:
            bound = f"{'>' if strict else '>='} {lo}" + f" and < {hi}" * (hi < math.inf)
            raise argparse.ArgumentTypeError(f"must be {bound} (got {s})")
        return kind(s)
    return parse

count, size, nonneg, positive = ranged(int, 0), ranged(int, 1), ranged(float, 0), ranged(float, 0, strict=True)
fraction, seed = ranged(float, 0, 1), ranged(int, 0, 2 ** 32)

def cli(main, argv=None):
    """main(argv) -> exit code: a UsageError is one line and its code, Ctrl-C outside the training loop 130."""
    try:
        return main(argv) or 0
    except (UsageError, KeyboardInterrupt) as e:
        print(f"error: {e if isinstance(e, UsageError) else 'interrupted'}", file=sys.stderr)
        return getattr(e, "code", 130)

def pick_device(name):
    """-> (rank, world size, device), 'auto' being cuda, then mps, then cpu; under torchrun join the process group."""
    n = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available()), "cpu": 1}
    kind, colon, i = (next(k for k in n if n[k]) if name == "auto" else name).partition(":")
    if colon and not i.isdigit() or int(i or 0) >= n.get(kind, 0):
        raise UsageError(f"--device {name}: no such device on this machine (use auto, cpu, cuda, cuda:N or mps)")
    world, dev = int(os.environ.get("WORLD_SIZE", 1)), torch.device(kind)
    if kind == "cuda":  # under torchrun one GPU a process
        torch.cuda.set_device(dev := torch.device("cuda", int(os.environ["LOCAL_RANK"] if world > 1 else i or 0)))
    if world > 1:  # NCCL between GPUs, gloo between CPU processes
        torch.distributed.init_process_group("nccl" if kind == "cuda" else "gloo")
    return int(os.environ.get("RANK", 0)), world, dev

def leave_group(world):
    """Under torchrun: wait for every rank, then leave the process group together (rank 0 may sample after)."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

def any_rank(flag, world, dev):
    """True on every process when true on any (under DDP call it on every rank at the same step)."""
    t = torch.tensor(float(bool(flag)), device=dev)
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t)


# ----------------------------------------------------------------------------- embeddings, data, images
def timestep_embedding(t, dim, max_period=10000):
    """(N,) float times -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), dim even."""
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos table (grid², dim): the first half of the channels encodes the row, the second the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([timestep_embedding(rows.flatten(), dim // 2), timestep_embedding(cols.flatten(), dim // 2)], 1)

def load_dataset(name, data_dir, batch=1, train=True):
    """A whole split as uint8 images (N, C, H, W) and int64 labels (N,), at least `batch` images."""
    cls = getattr(torchvision.datasets, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}[name])
    folder = os.path.join(data_dir, f"{cls.__name__}/raw" if name != "cifar10" else cls.base_folder)
    found = os.path.isdir(folder) and os.listdir(folder)
    try:  # downloads into an empty folder when the network allows
        ds = cls(root=data_dir, train=train, download=not found)
    except Exception as e:
        why = " ".join(str(e).split())[:60]  # torchvision's message spans lines
        raise UsageError(f"{name} {'is corrupt or incomplete in' if found else 'not found in'} {folder} "
                         f"({why}): place torchvision's files there, or empty it and connect to the network")
    if len(ds) < batch:
        raise UsageError(f"{folder} has {len(ds)} images; this run needs at least {batch} images (--batch-size x processes)")
    x = torch.as_tensor(np.asarray(ds.data))
    return (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous(), torch.as_tensor(ds.targets).long()

def to_image(x, nrow, scale=2):
    """(N, C, H, W) in [0, 1] -> PIL grid, `nrow` a row, 2 px white lines, each pixel scale x scale."""
    g = torchvision.utils.make_grid(x.detach().float().cpu().clamp(0, 1), nrow=nrow, pad_value=1)[:x.shape[1]]
    img = Image.fromarray((g.permute(1, 2, 0).squeeze(-1) * 255 + 0.5).byte().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

def save_samples(draw, dev, classes, scales, out, tag, seed, view=lambda x: (x + 1) / 2, n=10):
    """One grid per CFG scale (row = class; scales None: unconditional) and a GIF of the last, from one batched draw."""
    y = torch.arange(classes, device=dev).repeat_interleave(n).repeat(len(scales or [1]))
    scale = torch.tensor(scales or [1.0], device=dev).repeat_interleave(classes * n).view(-1, 1, 1, 1)
    x, snaps = draw(y, scale, torch.Generator(dev).manual_seed(seed), frames=40)  # snaps: (N, C, H, W) each
    for i, s in enumerate(scales or [None]):
        name = f"grid_{tag}.png" if s is None else f"grid_{tag}_cfg{s:g}.png"
        to_image(view(x[i * classes * n:(i + 1) * classes * n]), n).save(os.path.join(out, name))
    gif = [to_image(view(f[-classes * n:]), n) for f in snaps]
    gif[0].save(f"{out}/denoise_{tag}.gif", save_all=True, append_images=gif[1:], duration=[60] * len(gif[1:]) + [1500])
    return x, y

def progress(what, total):
    """-> tick(done): prints `what done/total img/s N eta T` each time another tenth of `total` is done."""
    t0, shown = time.time(), [0]
    def tick(done):
        if done * 10 // total > shown[0] * 10 // total:
            shown[0], rate = done, done / max(time.time() - t0, 1e-9)
            print(f"{what} {done}/{total} img/s {rate:.1f} eta {(total - done) / rate / 60:.1f} min", flush=True)
    return tick

def write_npz(draw, dev, num, classes, scale, out, seed, **meta):
    """samples.npz, written atomically: x in [0, 1] (N, C, H, W), balanced labels y and the CFG scale (classes > 0)."""
    y, gen = torch.arange(num) % max(1, classes), torch.Generator(dev).manual_seed(seed + 1)
    xs, tick = [], progress("samples", num)
    for b in y.split(min(500, -(-num // 10))):  # a tenth a batch (at most 500 images), then a progress line
        xs.append(draw(b.to(dev), scale, gen)[0])
        tick(sum(map(len, xs)))
    x = torch.cat(xs)
    z = dict(x=((x + 1) / 2).float().cpu().numpy(), **({"y": y.numpy(), "cfg_scale": scale} if classes else {}), **meta)
    atomic_write(f"{out}/samples.npz", lambda f: np.savez_compressed(f, **z))
    print(f"wrote {out}/samples.npz: {num} samples, " + ", ".join(f"{k} {v}" for k, v in meta.items()))
    return x, y

def save_loss(log, out, title, w=640, h=400, m=40):
    """loss.csv (step, mean loss since the row before) and loss.png (log10 loss against step, in a box)."""
    with open(f"{out}/loss.csv", "w") as f:
        f.write("step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log))
    pts, img = [(s, math.log10(v)) for s, v in log if 0 < v < math.inf] or [(0, 0)], Image.new("RGB", (w, h), "white")
    (s0, s1), (lo, hi) = [(min(p), max(p) + 1e-9) for p in zip(*pts)]  # step range, log10 loss range
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m, w - m, h - m], outline="gray")
    draw.line([(m + (s - s0) / (s1 - s0) * (w - 2 * m), h - m - (v - lo) / (hi - lo) * (h - 2 * m)) for s, v in pts],
              fill=(31, 119, 180), width=2)
    draw.text((m, 10), f"{title}: {10 ** hi:.3g} (top) .. {10 ** lo:.3g} (bottom), log scale; steps {s0}..{s1:.0f}",
              fill="black")
    img.save(f"{out}/loss.png")


# ----------------------------------------------------------------------------- training
def lr_at(step, lr, warmup, total):
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

@torch.no_grad()
def ema_update(ema, model, step, decay):
    """EMA with warm-up: the decay grows as (1+step)/(10+step) up to `decay`, so short runs still average."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - min(decay, (1 + step) / (10 + step)))

def train_step(a, net, opt, obj, x, y, lr):
    """One optimiser step on obj.loss (whatever the objective) for a batch; the loss as a tensor (no host sync)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=a.amp):
        loss = obj.loss(net, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    return loss.detach()

@contextlib.contextmanager
def stop_signals():
    """Inside: Ctrl-C and SIGTERM only set a flag (the loop saves and stops at a step); the old handlers after."""
    stop, old = [], {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, lambda *_: stop.append(1))
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- checkpoints, the run folder
def atomic_write(path, write):
    """write(temp file), then rename over `path`: a kill or a full disk keeps the old file and leaves no temp file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise UsageError(f"could not write {path} ({e})" + "; the previous one is kept" * os.path.exists(path), 1)

def save_checkpoint(ckpt, path):
    """A plain dict of tensors and plain values, written atomically; weights that are not finite are never written."""
    if not all(v.isfinite().all() for k in ("model", "ema") for v in ckpt[k].values() if v.is_floating_point()):
        raise UsageError(f"weights are NaN/inf at step {ckpt['step']} (try a lower --lr); nothing saved"
                         + f", {path} keeps the last good state" * os.path.exists(path), 1)
    atomic_write(path, lambda f: torch.save(ckpt, f))

def load_checkpoint(path, script, keys=("model", "ema", "opt", "step", "args", "rng")):
    """torch.load(weights_only=True): tensors and plain values only, no code runs; any problem is one UsageError."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} " + ("does not exist" if not os.path.isfile(path) else "holds objects "
                         "other than tensors and plain values: refused" if "GLOBAL" in str(e) or "class" in str(e)
                         else f"is truncated or corrupt ({str(e)[:60]})"))
    got, lacks = ckpt.get("script") if isinstance(ckpt, dict) else None, [k for k in keys if k not in ckpt]
    if got != script or lacks:
        raise UsageError(f"checkpoint {path} " + (f"was written by {got or 'another program'}, not {script}.py"
                                                  if got != script else f"lacks {', '.join(lacks)}"))
    return ckpt

def load_state(ckpt, path, model, ema, opt=None):
    """Weights from a checkpoint and, given the optimiser (a resume), its state and the RNG; a mismatch: one line."""
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        if opt:
            opt.load_state_dict(ckpt["opt"])
            torch.set_rng_state(ckpt["rng"][0])
            if len(ckpt["rng"]) > 1:  # the CUDA generators
                torch.cuda.set_rng_state_all(ckpt["rng"][1:])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise UsageError(f"checkpoint {path} does not fit this model ({str(e).splitlines()[0][:100]})")

def parse_args(parser, argv, quick, script):
    """-> (args, checkpoint or None). --quick swaps in the small recipe's defaults; --resume / --ckpt PATH brings every
    flag of that run (--out-dir: the checkpoint's folder), and a flag named beside it wins."""
    p = parser()
    p.set_defaults(**quick if p.parse_args(argv).quick else {})
    a = p.parse_args(argv)
    if not (path := a.resume or a.ckpt):
        return a, None
    ckpt = load_checkpoint(path, script)
    p.set_defaults(**{**ckpt["args"], "out_dir": os.path.dirname(path) or ".", "resume": "", "ckpt": "",
                      "sample_only": False})
    return p.parse_args(argv), ckpt

def claim_out_dir(out, fresh):
    """Make --out-dir; refuse it if it is not a writable folder or, for a fresh run, holds another run."""
    with contextlib.suppress(OSError):
        os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK) or not os.path.isdir(out):
        raise UsageError(f"--out-dir {out} is not a writable folder")
    if fresh and os.path.exists(f"{out}/ckpt.pt"):
        raise UsageError(f"--out-dir {out} already holds a run: continue it with --resume {out}/ckpt.pt, or remove it "
                         f"or choose another --out-dir to start over")
