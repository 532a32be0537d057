"""The run harness the scripts share: one-line errors and typed flags, device and DDP, dataset loading and its checks,
the training run's books (steps, shuffles, progress line, signals), checkpoints, samples.npz and the run folder."""
import argparse
import contextlib
import inspect
import math
import os
import re
import shlex
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torchvision

from common import atomic_write, save_loss

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
    parse.__name__ = kind.__name__  # argparse's message for a non-number: "invalid int value: 'x'"
    return parse

count = ranged(int, 0)
size = ranged(int, 1)
step_count = ranged(int, 1, 100_001)  # diffusion or sampler steps: a schedule or a path of that many fits in memory
cfg_scale = ranged(float, 0, 1000)  # a CFG scale: larger ones overflow float32 samples
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
    except OSError as e:  # a failed write (atomic_write names the file and says what was kept)
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


def built(build, a, dev):
    """build(a, dev), or one line if the model does not fit in the device's memory (before anything is written)."""
    try:
        return build(a, dev)
    except (RuntimeError, MemoryError) as e:
        if not isinstance(e, MemoryError) and "memory" not in str(e):
            raise
        raise UsageError(f"this model does not fit in the memory of {dev} ({' '.join(str(e).split())[-90:]}): "
                         f"choose smaller sizes")

def defaults(*objects):
    """{parameter: default} of these classes and functions: the scripts' flags take their defaults from the model and
    the objective, so a class built with only the data's shape is what the script trains by default."""
    params = [p for f in objects for p in inspect.signature(f).parameters.values()]
    return {p.name: p.default for p in params if p.default is not p.empty}


# ----------------------------------------------------------------------------- data
def load_dataset(name, data_dir, shape, batch=1, train=True):
    """A whole split as uint8 images (N, C, H, W) and int64 labels (N,), checked against shape = (C, size, classes):
    images of that size, one label an image, each in 0..classes-1, and at least `batch` images."""
    cls = getattr(torchvision.datasets, {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}[name])
    folder = os.path.join(data_dir, f"{cls.__name__}/raw" if name != "cifar10" else cls.base_folder)
    found = os.path.isdir(folder) and os.listdir(folder)
    made = [d for d in (data_dir, os.path.dirname(folder), folder) if not os.path.isdir(d)]  # a download makes them
    try:  # downloads into an empty folder when the network allows
        ds = cls(root=data_dir, train=train, download=not found)
    except Exception as e:  # noqa: BLE001 (whatever torchvision raises: missing, truncated or corrupt files)
        for d in reversed(made):  # the folders the failed download made, if empty
            with contextlib.suppress(OSError):
                os.rmdir(d)
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


# ----------------------------------------------------------------------------- the training run's books
class Run:
    """A training run's books: its length and step, each epoch's seeded shuffle, the loss log and the progress line,
    Ctrl-C / SIGTERM, and at each epoch's end (or a stop) the checkpoint, loss.csv / loss.png and the grids."""
    def __init__(self, a, script, model, ema, opt, n_images, ckpt, dev, rank, world, outputs):
        self.a, self.script, self.dev, self.rank, self.world = a, script, dev, rank, world
        self.model, self.ema, self.opt = model, ema, opt
        self.outputs = outputs  # outputs(tag): the grids and the GIF of epoch `tag`
        self.n_images = n_images
        self.per_epoch = n_images // (a.batch_size * world)  # every rank takes its own batch of the shared shuffle
        if not self.per_epoch:
            raise UsageError(f"{n_images} training images are fewer than a step's {a.batch_size} x {world} process(es)")
        self.total = a.max_steps or a.epochs * self.per_epoch  # the learning-rate schedule spans the run
        self.step, self.rows = (ckpt["step"], ckpt["loss_log"]) if ckpt else (0, [])
        acc, self.n = ckpt["loss_acc"] if ckpt else (0.0, 0)  # the loss summed since the last row, and its steps
        self.acc = torch.tensor(acc).to(dev)  # on the device: no host sync a step
        self.path = f"{a.out_dir}/ckpt.pt"
        self.halt = False
        self.say = print if rank == 0 else lambda *_, **__: None

    def batches(self):
        """This rank's image indices, one batch a step, from the step reached to the run's end: each epoch a shuffle
        seeded by (--seed, epoch), the same on every rank and on a resume; at each epoch's end (or a stop) save()."""
        a, B = self.a, self.a.batch_size
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.say(f"training {params:.3g}M params on {self.n_images} images, {self.world} process(es) x batch {B}, "
                 f"steps {self.step}..{self.total}, {self.dev}, amp {a.amp}")
        self.start, self.t_start = self.step, time.time()
        self.s0, self.t0 = self.step, time.time()  # img/s and the ETA count training steps only
        if self.rank == 0 and self.step and self.tag() and not os.path.exists(f"{a.out_dir}/denoise_{self.tag()}.gif"):
            self.outputs(self.tag())  # the images of the epoch the run stopped at, lost to a failed write
        with stop_signals() as self.stop:
            while self.step < self.total and not self.halt:
                epoch, i0 = divmod(self.step, self.per_epoch)
                gen = torch.Generator().manual_seed(a.seed * 1000 + epoch)
                perm = torch.randperm(self.n_images, generator=gen).to(self.dev)
                for i in range(i0, self.per_epoch):
                    first = (i * self.world + self.rank) * B
                    yield perm[first:first + B]
                    if self.step == self.total or self.halt:
                        break
                if self.rank == 0:
                    self.save()
                self.s0, self.t0 = self.step, time.time()
        self.halt = self.halt or bool(self.stop)  # a signal during the last save stops the run too

    def log(self, loss):
        """After a step: count it and add its loss; every --log-every steps a loss.csv row and the progress line (the
        only host sync). Under DDP a stop is agreed on at those steps, so that every rank halts at the same one."""
        a = self.a
        self.acc += loss
        self.step += 1
        self.n += 1
        if self.step % a.log_every == 0 or self.step == self.total:
            self.rows.append((self.step, self.acc.item() / self.n))
            if not math.isfinite(self.rows[-1][1]):
                raise UsageError(f"loss is {self.rows[-1][1]} at step {self.step}; stopped (try a lower --lr)", 1)
            ips = (self.step - self.s0) * a.batch_size * self.world / (time.time() - self.t0)
            eta = (self.total - self.step) * a.batch_size * self.world / ips / 60
            self.say(f"epoch {(self.step - 1) // self.per_epoch + 1}/{-(-self.total // self.per_epoch)} step "
                     f"{self.step}/{self.total} loss {self.rows[-1][1]:.4f} img/s {ips:.0f} eta {eta:.1f} min",
                     flush=True)
            self.acc, self.n = self.acc * 0, 0
        agree = self.world == 1 or self.step % min(a.log_every, 10) == 0  # under DDP: a sync every 10 steps at most
        self.halt = agree and any_rank(self.stop, self.world, self.dev)

    def save(self):
        """The checkpoint first (sampling cannot lose it), then loss.csv / loss.png, and at an epoch's end the grids."""
        rng = [torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if self.dev.type == "cuda" else [])]
        state = dict(model=self.model.state_dict(), ema=self.ema.state_dict(), opt=self.opt.state_dict(), rng=rng)
        save_checkpoint(dict(script=self.script, step=self.step, args=vars(self.a), loss_log=self.rows,
                             loss_acc=(self.acc.item(), self.n), **state), self.path)
        save_loss(self.rows, self.a.out_dir, f"{self.script}: training loss")
        if self.tag():
            self.outputs(self.tag())

    def tag(self):
        """eNNN at an epoch's end or the run's (the grids and the GIF are drawn then), else ''."""
        end = self.step % self.per_epoch == 0 or self.step == self.total
        return f"e{-(-self.step // self.per_epoch):03d}" * end

    def end(self):
        """The closing line: the command that resumes a stopped run, or the steps and seconds trained (curve.py reads
        it); -> whether the run stopped early."""
        if self.halt:
            launcher = f"torchrun --nproc_per_node={self.world}" if self.world > 1 else "python"
            self.say(f"stopped at step {self.step}; resume with:\n  {launcher} {self.script}.py "
                     f"--resume={shlex.quote(self.path)}")
        else:
            self.say(f"trained {self.step - self.start} steps in {time.time() - self.t_start:.1f} s "
                     f"(with checkpoints and grids)")
        return self.halt

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



# ----------------------------------------------------------------------------- samples.npz, checkpoints, the run folder
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
    if not x.isfinite().all():
        raise UsageError(f"samples are NaN/inf at CFG scale {scale} (a scale this large overflows); samples.npz is "
                         f"not written", 1)
    z = dict(x=((x + 1) / 2).float().cpu().numpy(), **({"y": y.numpy(), "cfg_scale": scale} if classes else {}), **meta)
    atomic_write(f"{out}/samples.npz", lambda f: np.savez_compressed(f, **z))
    print(f"wrote {out}/samples.npz: {num} samples, " + ", ".join(f"{k} {v}" for k, v in meta.items()))
    return x, y

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
            flags = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # built from the flags
            opt.load_state_dict(ckpt["opt"])
            for g, f in zip(opt.param_groups, flags):  # the run's moments, the flags' hyperparameters (--beta2 ...)
                g.update(f)
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

def parse_args(parser, argv, quick, script, weights=()):
    """-> (args, checkpoint or None). --quick swaps in the small recipe's defaults; --resume / --ckpt PATH brings every
    flag of that run, checked as typed flags are (--out-dir: the checkpoint's folder); a flag named beside it wins,
    but for the flags `weights` (the model's shape and what its output means), which must keep the run's values."""
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
        if changed := [k for k in weights if k in ckpt["args"] and getattr(a, k) != ckpt["args"][k]]:
            flag = "--" + changed[0].replace("_", "-")
            raise UsageError(f"{flag} {getattr(a, changed[0])}: the weights of {path} were trained with {flag} "
                             f"{ckpt['args'][changed[0]]}; start a new run to change it")
        bare = parser()  # which flags this command line names
        for act in bare._actions:
            act.default = argparse.SUPPRESS
        named = vars(bare.parse_args(argv))
        if "epochs" in named and "max_steps" not in named:  # --epochs beside --resume sets the run's length
            a.max_steps = 0
    if a.num_samples > MAX_SAMPLES:
        raise UsageError(f"argument --num-samples: must be <= {MAX_SAMPLES} (got {a.num_samples}): samples.npz is "
                         f"built in memory")
    return a, ckpt

def alive(pid):
    """Whether a process with this PID exists (signal 0 only asks)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; a number no PID can be
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
    if a.sample_only and os.path.exists(ckpt) and not os.path.samefile(a.ckpt, ckpt):
        raise UsageError(f"--out-dir {out} holds another run than --ckpt {a.ckpt}: its samples would be replaced; "
                         f"choose another --out-dir, or the checkpoint's own folder")
    taken = os.path.exists(ckpt) and not a.sample_only  # samples may go beside their own run
    if taken and not a.resume:
        raise UsageError(f"--out-dir {out} already holds a run: continue it with --resume {ckpt}, or remove it or "
                         f"choose another --out-dir to start over")
    if taken and not os.path.samefile(a.resume, ckpt):
        raise UsageError(f"--out-dir {out} holds another run than --resume {a.resume}: resume into the checkpoint's "
                         f"own folder, or choose an empty --out-dir")
    ours = r"(ckpt\.pt|loss\.csv|loss\.png|samples\.npz|metrics\.csv|(grid|denoise|compare)_\w+\.(png|gif))"
    for name in os.listdir(out):  # ckpt.pt.tmpPID and the like, left by a kill -9: this run owns the folder now
        if re.fullmatch(ours + r"\.tmp\d+", name):  # the scripts' own temp files only
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out, name))
