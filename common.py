"""What the scripts share: one-line errors and flag types, device, embeddings, data, images, training, checkpoints."""
import argparse
import contextlib
import math
import os
import re
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw

MAX_SAMPLES = 1_000_000  # --num-samples at most: samples.npz is built in memory (MNIST: 3.1 GB of floats)
STOPS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}  # the signals that stop a run, as cli names them
CAUGHT = []  # the stop signals stop_signals caught in this run: cli exits with 128 + the first
LOCKS = []  # the --out-dir lock files this process holds (claim_out_dir); cli removes them when main returns
OWN = ("out_dir", "resume", "ckpt", "sample_only", "quick")  # flags of the command, never taken from a checkpoint


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

count = ranged(int, 0)
size = ranged(int, 1)
nonneg = ranged(float, 0)
positive = ranged(float, 0, strict=True)
fraction = ranged(float, 0, 1)
seed = ranged(int, 0, 2 ** 32)

def interrupt(signum, frame):
    """SIGTERM outside the training loop stops the run like Ctrl-C (cli then exits with 143)."""
    raise KeyboardInterrupt(signum)

def cli(main, argv=None):
    """main(argv) -> exit code: a UsageError is one line and its code; a stop by Ctrl-C or SIGTERM is one line and
    130 or 143, also when the training loop saved the run first."""
    CAUGHT.clear()
    term = signal.signal(signal.SIGTERM, interrupt)
    try:
        code = main(argv) or 0
        if CAUGHT:  # the training loop stopped on a signal (or one came during its last save)
            raise KeyboardInterrupt(CAUGHT[0])
        return code
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt as e:
        sig = e.args[0] if e.args else signal.SIGINT
        print(f"error: {STOPS[sig]}", file=sys.stderr)
        return 128 + sig
    except OSError as e:  # a write outside common.py's guarded ones (those name their file)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, term)
        while LOCKS:
            with contextlib.suppress(OSError):
                os.remove(LOCKS.pop())

def pick_device(name):
    """-> (rank, world size, device), 'auto' being cuda, then mps, then cpu; under torchrun join the process group."""
    n = {"cuda": torch.cuda.device_count(), "mps": int(torch.backends.mps.is_available()), "cpu": 1}
    kind, colon, i = (next(k for k in n if n[k]) if name == "auto" else name).partition(":")
    if colon and not i.isdigit() or int(i or 0) >= n.get(kind, 0):
        raise UsageError(f"--device {name}: no such device on this machine (use auto, cpu, cuda, cuda:N or mps)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(kind)
    if kind == "cuda":  # under torchrun one GPU a process
        dev = torch.device("cuda", int(os.environ["LOCAL_RANK"] if world > 1 else i or 0))
        torch.cuda.set_device(dev)
    if world > 1:  # NCCL between GPUs, gloo between CPU processes
        torch.distributed.init_process_group("nccl" if kind == "cuda" else "gloo")
    return int(os.environ.get("RANK", "0")), world, dev

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

def load_dataset(name, data_dir, shape, batch=1, train=True):
    """A whole split as uint8 images (N, C, H, W) and int64 labels (N,), checked against shape = (C, size, classes):
    images of that size, one label an image, each in 0..classes-1, and at least `batch` images."""
    cls = getattr(torchvision.datasets, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}[name])
    folder = os.path.join(data_dir, f"{cls.__name__}/raw" if name != "cifar10" else cls.base_folder)
    found = os.path.isdir(folder) and os.listdir(folder)
    try:  # downloads into an empty folder when the network allows
        ds = cls(root=data_dir, train=train, download=not found)
    except Exception as e:  # noqa: BLE001 (whatever torchvision raises: missing, truncated or corrupt files)
        why = " ".join(str(e).split())[:60]  # torchvision's message spans lines
        raise UsageError(f"{name} {'is corrupt or incomplete in' if found else 'not found in'} {folder} "
                         f"({why}): place torchvision's files there, or empty it and connect to the network")
    x = torch.as_tensor(np.asarray(ds.data))
    x = (x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()
    y = torch.as_tensor(ds.targets).long()
    c, s, classes = shape
    split = f"the {'training' if train else 'test'} split of {name} in {folder}"
    if x.shape[1:] != (c, s, s):
        raise UsageError(f"{split} holds {x.shape[2]}x{x.shape[3]}x{x.shape[1]} images; {name} is {s}x{s}x{c}")
    if len(y) != len(x):
        raise UsageError(f"{split} holds {len(x)} images but {len(y)} labels; it needs one label an image")
    if len(x) < batch:
        raise UsageError(f"{split} holds {len(x)} images; this run needs at least {batch} images "
                         f"(--batch-size x processes)")
    if y.min() < 0 or y.max() >= classes:
        raise UsageError(f"{split} holds labels {y.min()}..{y.max()}; {name} has labels 0..{classes - 1}")
    return x, y

def to_image(x, nrow, scale=2):
    """(N, C, H, W) in [0, 1] -> PIL grid, `nrow` a row, 2 px white lines, each pixel scale x scale."""
    g = torchvision.utils.make_grid(x.detach().float().cpu().clamp(0, 1), nrow=nrow, pad_value=1)[:x.shape[1]]
    img = Image.fromarray((g.permute(1, 2, 0).squeeze(-1) * 255 + 0.5).byte().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

def save_image(img, path, **options):
    """A PIL image in the format its name ends in (.png, .gif), written atomically; `options` go to PIL."""
    atomic_write(path, lambda f: img.save(f, os.path.splitext(path)[1][1:], **options))

def save_samples(draw, dev, classes, scales, out, tag, seed, view=lambda x: (x + 1) / 2, n=10):
    """One grid per CFG scale (row = class; scales None: unconditional) and a GIF of the last, from one batched draw."""
    y = torch.arange(classes, device=dev).repeat_interleave(n).repeat(len(scales or [1]))
    scale = torch.tensor(scales or [1.0], device=dev).repeat_interleave(classes * n).view(-1, 1, 1, 1)
    x, snaps = draw(y, scale, torch.Generator(dev).manual_seed(seed), frames=40)  # snaps: (N, C, H, W) each
    for i, s in enumerate(scales or [None]):
        name = f"grid_{tag}.png" if s is None else f"grid_{tag}_cfg{s:g}.png"
        save_image(to_image(view(x[i * classes * n:(i + 1) * classes * n]), n), os.path.join(out, name))
    gif = [to_image(view(f[-classes * n:]), n) for f in snaps]
    durations = [60] * len(gif[1:]) + [1500]  # ms a frame, the last held
    save_image(gif[0], f"{out}/denoise_{tag}.gif", save_all=True, append_images=gif[1:], duration=durations)
    return x, y

def progress(what, total):
    """-> tick(done): prints `what done/total img/s N eta T` each time another tenth of `total` is done."""
    t0 = time.time()
    shown = [0]
    def tick(done):
        if done * 10 // total > shown[0] * 10 // total:
            shown[0] = done
            rate = done / max(time.time() - t0, 1e-9)
            print(f"{what} {done}/{total} img/s {rate:.1f} eta {(total - done) / rate / 60:.1f} min", flush=True)
    return tick

def write_npz(draw, dev, num, classes, scale, out, seed, **meta):
    """samples.npz, written atomically: x in [0, 1] (N, C, H, W), balanced labels y and the CFG scale (classes > 0)."""
    y = torch.arange(num) % max(1, classes)
    gen = torch.Generator(dev).manual_seed(seed + 1)
    xs = []
    tick = progress("samples", num)
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
    csv = "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log)
    atomic_write(f"{out}/loss.csv", lambda f: f.write(csv.encode()))
    pts = [(s, math.log10(v)) for s, v in log if 0 < v < math.inf] or [(0, 0)]
    (s0, s1), (lo, hi) = [(min(p), max(p) + 1e-9) for p in zip(*pts)]  # step range, log10 loss range
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m, w - m, h - m], outline="gray")
    draw.line([(m + (s - s0) / (s1 - s0) * (w - 2 * m), h - m - (v - lo) / (hi - lo) * (h - 2 * m)) for s, v in pts],
              fill=(31, 119, 180), width=2)
    draw.text((m, 10), f"{title}: {10 ** hi:.3g} (top) .. {10 ** lo:.3g} (bottom), log scale; steps {s0}..{s1:.0f}",
              fill="black")
    save_image(img, f"{out}/loss.png")


# ----------------------------------------------------------------------------- training
def lr_at(step, lr, warmup, total):
    """Linear warm-up over min(warmup, total // 2) steps (so every run decays), then cosine decay to 0 at `total`."""
    warmup = min(warmup, total // 2)
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
    """Inside: Ctrl-C and SIGTERM are only noted in CAUGHT, the list yielded (the loop saves and stops at a step, and
    cli exits with 130 / 143); the old handlers after."""
    CAUGHT.clear()
    old = {s: signal.getsignal(s) for s in STOPS}
    try:
        for s in old:
            signal.signal(s, lambda signum, _: CAUGHT.append(signum))
        yield CAUGHT
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- checkpoints, the run folder
def atomic_write(path, write):
    """write(temp file), then rename over `path`: a failed write is one line (exit code 1) and keeps the old file; a
    failure, Ctrl-C or SIGTERM leaves no temp file (a kill -9 may: the next run in the folder removes it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = "; the previous one is kept" * os.path.exists(path)
        raise UsageError(f"could not write {path} ({' '.join(str(e).split())}){kept}", 1)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)

def save_checkpoint(ckpt, path):
    """A plain dict of tensors and plain values, written atomically; weights that are not finite are never written."""
    if not all(v.isfinite().all() for k in ("model", "ema") for v in ckpt[k].values() if v.is_floating_point()):
        raise UsageError(f"weights are NaN/inf at step {ckpt['step']} (try a lower --lr); nothing saved"
                         + f", {path} keeps the last good state" * os.path.exists(path), 1)
    atomic_write(path, lambda f: torch.save(ckpt, f))

def whole(v):
    """An int >= 0, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0

def real(v):
    """An int or a float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)

def pair(v, first, second):
    """A tuple or list of two items that pass first and second."""
    return isinstance(v, (tuple, list)) and len(v) == 2 and first(v[0]) and second(v[1])

def tensors(v):
    """A dict of tensors (a state dict)."""
    return isinstance(v, dict) and all(map(torch.is_tensor, v.values()))

FIELDS = {  # what each field of a checkpoint must hold: the words for the error, the test
    "model": ("a dict of tensors", tensors),
    "ema": ("a dict of tensors", tensors),
    "opt": ("an optimiser state (a dict)", lambda v: isinstance(v, dict)),
    "args": ("a dict of flags", lambda v: isinstance(v, dict)),
    "step": ("a whole number", whole),
    "rng": ("a non-empty list of tensors", lambda v: isinstance(v, list) and v != [] and all(map(torch.is_tensor, v))),
    "loss_log": ("a list of (step, loss)", lambda v: isinstance(v, list) and all(pair(p, whole, real) for p in v)),
    "loss_acc": ("a (loss sum, count) pair", lambda v: pair(v, real, whole)),
    "test_acc": ("a number", real),
}

def load_checkpoint(path, script, keys=("model", "ema", "opt", "step", "args", "rng", "loss_log", "loss_acc")):
    """torch.load(weights_only=True): tensors and plain values only, no code runs; the fields `keys` must be what
    FIELDS says; any problem is one UsageError."""
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (whatever the unpickler raises: the file is refused in one line)
        why = " ".join(str(e).split()).split("WeightsUnpickler error: ")[-1]  # torch's reason, not its advice
        raise UsageError(f"checkpoint {path} " + ("does not exist" if not os.path.isfile(path) else "holds objects "
                         "other than tensors and plain values: refused" if "GLOBAL" in why or "class" in why
                         else f"is truncated or corrupt ({why[:60]})"))
    got = ckpt.get("script") if isinstance(ckpt, dict) else None
    if got != script:
        raise UsageError(f"checkpoint {path} was written by {got or 'another program'}, not {script}.py")
    if lacks := [k for k in keys if k not in ckpt]:
        raise UsageError(f"checkpoint {path} lacks {', '.join(lacks)}")
    if bad := [k for k in keys if not FIELDS[k][1](ckpt[k])]:
        raise UsageError(f"checkpoint {path} holds a bad {bad[0]}: it must be {FIELDS[bad[0]][0]}")
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

def saved_flags(p, args, path):
    """A checkpoint's flags (but OWN) as a command line for parser p, refused in one line where p refuses it: the
    checks of typed flags."""
    actions = {act.dest: act for act in p._actions if act.option_strings}
    argv = []
    for k, v in args.items():
        if k not in actions:
            raise UsageError(f"checkpoint {path} holds the flag {k!r}, which this script does not know")
        if k in OWN or v is None:
            continue
        act = actions[k]
        flag = act.option_strings[0]
        many = act.nargs in ("+", "*") or isinstance(act.nargs, int) and act.nargs > 1
        values = v if many and isinstance(v, list) else [v]
        if act.nargs == 0:  # a switch: --cond, or --amp / --no-amp
            if not isinstance(v, bool):
                raise UsageError(f"checkpoint {path} holds {flag} as a {type(v).__name__}; it must be true or false")
            argv += act.option_strings[:1] if v else act.option_strings[1:]
        elif not all(isinstance(x, (str, int, float)) for x in values):
            raise UsageError(f"checkpoint {path} holds {flag} as a {type(v).__name__}; it must be plain values")
        else:
            argv += [flag, *map(str, values)] if many else [f"{flag}={v}"]
    try:
        p.parse_args(argv)
    except UsageError as e:
        raise UsageError(f"checkpoint {path} holds a bad flag: {e}")
    return argv

def parse_args(parser, argv, quick, script):
    """-> (args, checkpoint or None). --quick swaps in the small recipe's defaults; --resume / --ckpt PATH brings every
    flag of that run, checked as typed flags are (--out-dir: the checkpoint's folder); a flag named beside it wins."""
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    p.set_defaults(**quick if p.parse_args(argv).quick else {})
    a = p.parse_args(argv)
    if a.resume and (a.ckpt or a.sample_only):
        raise UsageError("--resume PATH continues a run and --sample-only --ckpt PATH samples from one: "
                         "give one of them")
    path = a.resume or a.ckpt
    ckpt = load_checkpoint(path, script) if path else None
    if ckpt:
        p.set_defaults(out_dir=os.path.dirname(path) or ".")
        a = p.parse_args(saved_flags(p, ckpt["args"], path) + argv)  # the flags named here come last: they win
    if a.num_samples > MAX_SAMPLES:
        raise UsageError(f"argument --num-samples: must be <= {MAX_SAMPLES} (got {a.num_samples}): samples.npz is "
                         f"built in memory")
    return a, ckpt

def alive(pid):
    """Whether a process with this PID exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True

def lock_owner(path):
    """The PID in a lock file; 0 if it holds none (its run is about to write it, or it is gone)."""
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        return int(f.read())
    return 0

def hold(out):
    """Create OUT/.lock atomically (O_CREAT | O_EXCL) holding our PID; one whose process is gone is taken over."""
    path = os.path.join(out, ".lock")
    for _ in range(3):  # again after removing a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(path)
            if pid <= 0 or (pid != os.getpid() and alive(pid)):
                raise UsageError(f"--out-dir {out} is in use by a running run (pid {pid or '?'}); choose another "
                                 f"--out-dir, or remove {path} if no run is using it")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        LOCKS.append(path)
        return
    raise UsageError(f"--out-dir {out} is being claimed by other runs at this moment; choose another --out-dir")

def claim_out_dir(a):
    """Make --out-dir and hold it while this run lives (hold); refuse it if it is not a writable folder, is held by
    a running run, or holds another run (any but the one --resume continues). Temp files of killed runs go."""
    out = a.out_dir
    with contextlib.suppress(OSError):
        os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK) or not os.path.isdir(out):
        raise UsageError(f"--out-dir {out} is not a writable folder")
    hold(out)
    ckpt = os.path.join(out, "ckpt.pt")
    taken = os.path.exists(ckpt) and not a.sample_only  # samples may go beside a run
    if taken and not a.resume:
        raise UsageError(f"--out-dir {out} already holds a run: continue it with --resume {ckpt}, or remove it or "
                         f"choose another --out-dir to start over")
    if taken and not os.path.samefile(a.resume, ckpt):
        raise UsageError(f"--out-dir {out} holds another run than --resume {a.resume}: resume into the checkpoint's "
                         f"own folder, or choose an empty --out-dir")
    for name in os.listdir(out):  # ckpt.pt.tmpPID and the like, left by a kill -9: this run owns the folder now
        if re.fullmatch(r".+\.tmp\d+", name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))
