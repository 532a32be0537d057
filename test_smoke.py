"""End-to-end smoke suite: every script's command line on tiny fake data (conftest.py), resume, sample-only, and
each fault class over all three scripts. CPU only, offline."""
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

import bench
import harness
import ddpm_unet
import dit_ddpm
import dit_flow
from conftest import fake_images, run_main, write_idx

HERE = os.path.dirname(os.path.abspath(__file__))
MODS = {"dit_ddpm": dit_ddpm, "dit_flow": dit_flow, "ddpm_unet": ddpm_unet}
TINY = {"dit_ddpm": ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--timesteps", "20"],
        "dit_flow": ["--dataset", "mnist", "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
                     "--patch-size", "4"],
        "ddpm_unet": ["--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20", "--cond"]}
SCRIPTS = pytest.mark.parametrize("name", list(MODS))


def tiny(name, data, out, *extra):
    """A tiny run of `name` on the fake MNIST (256 images: 16 steps an epoch at batch 16)."""
    return TINY[name] + ["--data-dir", data, "--out-dir", str(out), "--batch-size", "16", "--log-every", "1",
                         "--sample-steps", "2", "--cfg-scales", "1", "--device", "cpu", *extra]


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words), err


def load(path):
    return torch.load(path, weights_only=True)


def start(name, argv):
    """The script as its own process, stdout piped."""
    return subprocess.Popen([sys.executable, f"{name}.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=default_ctrl_c)


def default_ctrl_c():
    """Ctrl-C's default in the child: a shell that starts the tests in the background has them ignore SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(p, prefix):
    for line in p.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r}: {p.stderr.read()[-2000:]}")


@pytest.fixture(scope="module")
def trained(fake_mnist, tmp_path_factory):
    """A 2-step checkpoint of each script."""
    root = tmp_path_factory.mktemp("trained")
    for name, mod in MODS.items():
        assert run_main(mod, tiny(name, fake_mnist, root / name, "--max-steps", "2")) == 0
    return {name: str(root / name / "ckpt.pt") for name in MODS}


# ----------------------------------------------------------------------------- the command line
@SCRIPTS
def test_train_resume_sample(name, fake_mnist, tmp_path, capsys):
    mod = MODS[name]
    out = tmp_path / "run"
    argv = tiny(name, fake_mnist, out, "--epochs", "2", "--max-steps", "3", "--cfg-scales", "0", "2")
    assert run_main(mod, argv) == 0
    assert "\ntrained 3 steps in " in capsys.readouterr().out  # the line curve.py reads
    written = {"ckpt.pt", "loss.csv", "loss.png", "denoise_e001.gif", "grid_e001_cfg0.png", "grid_e001_cfg2.png"}
    assert written <= set(os.listdir(out))
    assert run_main(mod, ["--resume", f"{out}/ckpt.pt", "--max-steps", "20"]) == 0  # the path brings every flag back
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 20
    assert ck["args"]["cfg_scales"] == [0.0, 2.0] and ck["args"]["max_steps"] == 20
    assert (out / "grid_e002_cfg2.png").exists()
    assert (out / "loss.csv").read_text().count("\n") == 21
    argv = ["--sample-only", "--ckpt", f"{out}/ckpt.pt", "--out-dir", str(tmp_path / "s"), "--num-samples", "12",
            "--sample-cfg", "2.5"]
    assert run_main(mod, argv) == 0
    ticks = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("samples ")]  # a line a batch of 2
    assert len(ticks) == 6
    assert ticks[0].startswith("samples 2/12 img/s ") and " eta " in ticks[0]
    assert ticks[-1].startswith("samples 12/12 img/s ")
    s = np.load(tmp_path / "s" / "samples.npz")
    assert s["x"].shape == (12, 1, 28, 28)
    assert 0 <= s["x"].min() and s["x"].max() <= 1
    assert float(s["cfg_scale"]) == 2.5
    assert list(s["y"]) == [i % 10 for i in range(12)]
    assert (tmp_path / "s" / "grid_sample_cfg2.png").exists()


@SCRIPTS
def test_stop_on_an_epochs_last_step_then_resume_is_bit_identical(name, fake_mnist, tmp_path, monkeypatch):
    """Ctrl-C at step 16 (an epoch's end) still writes that epoch's grid; the resumed run equals the uninterrupted
    one in weights, EMA and every loss.csv row (the loss accumulated since the last row is in the checkpoint)."""
    mod = MODS[name]
    a, b = tmp_path / "a", tmp_path / "b"  # uninterrupted, interrupted

    def argv(out):
        return tiny(name, fake_mnist, out, "--epochs", "2", "--max-steps", "20", "--log-every", "5")
    assert run_main(mod, argv(a)) == 0
    calls = []
    real = harness.Run.log
    handler = signal.getsignal(signal.SIGINT)

    def ctrl_c_at_16(run, loss):
        calls.append(1)
        if len(calls) == 16:
            signal.raise_signal(signal.SIGINT)  # the run's handler only sets a flag
        return real(run, loss)
    monkeypatch.setattr(harness.Run, "log", ctrl_c_at_16)
    assert run_main(mod, argv(b)) == 130  # saved, then stopped like any Ctrl-C
    monkeypatch.undo()
    assert load(b / "ckpt.pt")["step"] == 16
    assert (b / "grid_e001_cfg1.png").exists()
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the loop
    assert run_main(mod, ["--resume", str(b / "ckpt.pt")]) == 0
    wa, wb = load(a / "ckpt.pt"), load(b / "ckpt.pt")
    assert wa["loss_log"] == wb["loss_log"]
    assert [s for s, _ in wa["loss_log"]] == [5, 10, 15, 20]
    for part in ("model", "ema"):
        assert all(torch.equal(wa[part][k], wb[part][k]) for k in wa[part]), part


@SCRIPTS
def test_quick_recipe(name):
    """--quick swaps in the script's QUICK defaults (shown in --help); a flag given beside it still wins."""
    mod = MODS[name]
    a, _ = harness.parse_args(mod.get_parser, ["--quick", "--epochs", "7"], mod.QUICK, name)
    assert a.epochs == 7 and all(getattr(a, k) == v for k, v in mod.QUICK.items() if k != "epochs")
    assert any(getattr(mod.get_parser().parse_args([]), k) != v for k, v in mod.QUICK.items())  # not the defaults
    assert "--quick" in mod.get_parser().format_help()


COMMON_BAD_FLAGS = [  # (extra flags, words of the error), for every script
    (["--seed", "-1"], "--seed: must be >= 0 and < 4294967296"),
    (["--seed", str(2 ** 32)], "--seed"),
    (["--epochs", "0"], "--epochs: must be >= 1 (got 0)"),
    (["--lr", "-1"], "--lr: must be > 0 (got -1)"),
    (["--cfg-scales", "nan"], "--cfg-scales"),
    (["--sample-only"], "needs --ckpt"),
    (["--sample-only", "--ckpt", "nope.pt"], "does not exist"),
    (["--device", "gpu"], "no such device"),
    (["--device", f"cuda:{torch.cuda.device_count()}"], "no such device"),
    (["--batch-size", "300"], "at least 300 images"),
]


@pytest.mark.parametrize("name, extra, words", [
    *[(n, e, w) for n in MODS for e, w in COMMON_BAD_FLAGS],
    ("dit_ddpm", ["--hidden-size", "30", "--num-heads", "4"], "multiple of 4 and of --num-heads"),
    ("dit_ddpm", ["--patch-size", "5"], "must divide 28, the image size"),
    ("dit_ddpm", ["--sample-steps", "50"], "<= --timesteps"),
    ("dit_ddpm", ["--sampler", "euler"], "--sampler: invalid choice"),
    ("dit_ddpm", ["--dataset", "imagenet"], "--dataset: invalid choice"),
    ("dit_ddpm", ["--label-dropout", "1.5"], "--label-dropout: must be >= 0 and < 1"),
    ("dit_flow", ["--patch-size", "3"], "must divide 28, the image size"),
    ("dit_flow", ["--sampler", "ddim"], "--sampler: invalid choice"),
    ("dit_flow", ["--t-sampling", "beta"], "--t-sampling: invalid choice"),
    ("ddpm_unet", ["--attn-res", "5"], "resolutions of this UNet [28, 14, 7]"),
    ("ddpm_unet", ["--channel-mults", "1", "2", "2", "2", "2", "2"], "below 2x2"),
    ("ddpm_unet", ["--channel-mults", "1", "0"], "--channel-mults: must be >= 1"),
    ("ddpm_unet", ["--base-channels", "6"], "multiple of 4"),
    ("ddpm_unet", ["--dropout", "1"], "--dropout"),
])
def test_bad_flags_exit_2(name, extra, words, fake_mnist, tmp_path, capsys):
    """One line, exit code 2, nothing written."""
    assert run_main(MODS[name], tiny(name, fake_mnist, tmp_path / "run", *extra)) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- faults, each over the three scripts
def write_idx_with(folder, truncate=False):
    x, y = fake_images(64)
    write_idx(folder, "train", x, y)
    write_idx(folder, "t10k", x, y)
    if truncate:
        with open(os.path.join(folder, "train-images-idx3-ubyte"), "r+b") as f:
            f.truncate(1000)


@SCRIPTS
@pytest.mark.parametrize("kind, words", [("offline", "not found in"), ("corrupt", "is corrupt or incomplete")])
def test_bad_data_exit_2(name, kind, words, tmp_path, capsys, monkeypatch):
    def offline(*args, **kw):  # a message over two lines, as torchvision's can be
        raise OSError("network is unreachable\ntried every mirror")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    if kind != "offline":
        write_idx_with(tmp_path / "d" / "MNIST" / "raw", truncate=kind == "corrupt")
    assert run_main(MODS[name], tiny(name, str(tmp_path / "d"), tmp_path / "o")) == 2
    one_line_error(capsys, words, "MNIST/raw")
    assert not (tmp_path / "o").exists()


class Exploit:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


BAD_CKPTS = {  # kind -> (make bad file from a good checkpoint, words of the error)
    "truncated": (lambda ck, p: p.write_bytes(open(ck, "rb").read()[:3000]), "truncated or corrupt"),
    "not torch": (lambda ck, p: p.write_bytes(b"not a checkpoint"), "truncated or corrupt"),
    "foreign": (lambda ck, p: torch.save({**load(ck), "script": "other"}, p), "was written by other"),
    "no rng": (lambda ck, p: torch.save({k: v for k, v in load(ck).items() if k != "rng"}, p), "lacks rng"),
    "code": (lambda ck, p: torch.save({**load(ck), "args": Exploit(p.parent / "pwned")}, p), "refused"),
    "odd weights": (lambda ck, p: torch.save({**load(ck), "model": {"x": torch.zeros(1)}}, p), "does not fit"),
}


@SCRIPTS
@pytest.mark.parametrize("kind", list(BAD_CKPTS))
def test_bad_checkpoint_exit_2(name, kind, trained, tmp_path, capsys):
    make, words = BAD_CKPTS[kind]
    make(trained[name], tmp_path / "bad.pt")
    for argv in (["--resume", str(tmp_path / "bad.pt")], ["--sample-only", "--ckpt", str(tmp_path / "bad.pt")]):
        assert run_main(MODS[name], argv + ["--out-dir", str(tmp_path / "o")]) == 2
        one_line_error(capsys, words)
    assert not (tmp_path / "pwned").exists()  # the code never ran
    assert not (tmp_path / "o").exists()


SIZE = {"dit_ddpm": "--hidden-size", "dit_flow": "--hidden-size", "ddpm_unet": "--base-channels"}


@SCRIPTS
def test_flags_beside_resume_win_and_other_weights_are_one_line(name, trained, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--resume", trained[name], "--out-dir", str(out), "--lr", "1e-5", "--max-steps", "3"]
    assert run_main(MODS[name], argv) == 0
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 3 and ck["args"]["lr"] == 1e-5  # the flags given
    assert ck["args"]["batch_size"] == 16  # the rest: the run's
    assert run_main(MODS[name], ["--sample-only", "--ckpt", trained[name], SIZE[name], "64"]) == 2
    one_line_error(capsys, f"{SIZE[name]} 64: the weights of {trained[name]} were trained with {SIZE[name]}")


def full_disk_on_call(n, real):
    """A save function that, on its n-th call, writes part of the file and then fails like a full disk."""
    calls = []

    def save(*args, **kw):  # torch.save(obj, f) or np.savez_compressed(f, **arrays)
        calls.append(1)
        if len(calls) == n:
            args[-1].write(b"partial")
            raise OSError(28, "No space left on device")
        return real(*args, **kw)
    return save


@SCRIPTS
@pytest.mark.parametrize("kind, words, code", [
    ("a file", "is not a writable folder", 2),
    ("cannot be made", "is not a writable folder", 2),
    ("holds a run", "already holds a run", 2),
    ("full disk: ckpt.pt", "No space left", 1),
    ("full disk: samples.npz", "No space left", 1),
])
def test_out_dir_faults(name, kind, words, code, trained, fake_mnist, tmp_path, capsys, monkeypatch):
    """Found before training (a file, a folder that cannot be made, another run's folder) or one line at the failed
    write, the previous file kept and no temp file left."""
    out = {"a file": tmp_path / "f", "cannot be made": "/proc/1/nope"}.get(kind, tmp_path / "run")
    (tmp_path / "f").write_text("x")
    argv = tiny(name, fake_mnist, out, "--epochs", "2", "--max-steps", "20", "--num-samples", "3")
    if kind == "holds a run":
        assert run_main(MODS[name], argv) == 0
    elif kind.startswith("full disk"):
        assert run_main(MODS[name], argv) == 0  # a good ckpt.pt (step 20) and samples.npz first
        argv = ["--resume", f"{out}/ckpt.pt", "--epochs", "3", "--max-steps", "33"]  # saves at steps 32 and 33
        if "ckpt" in kind:
            what, mod = torch, "save"
        else:
            what, mod = np, "savez_compressed"
        monkeypatch.setattr(what, mod, full_disk_on_call(1, getattr(what, mod)))
    capsys.readouterr()
    assert run_main(MODS[name], argv) == code
    one_line_error(capsys, words)
    monkeypatch.undo()
    if kind.startswith("full disk"):
        assert not [f for f in os.listdir(out) if ".tmp" in f]
        assert load(f"{out}/ckpt.pt")["step"] == (20 if "ckpt" in kind else 33)
        assert len(np.load(f"{out}/samples.npz")["x"]) == 3


@SCRIPTS
def test_nan_weights_are_never_saved(name, fake_mnist, tmp_path, monkeypatch, capsys):
    mod = MODS[name]
    real = harness.Run.log

    def poisoned(run, loss):  # after each optimiser step: NaN weights
        with torch.no_grad():
            for p in run.model.parameters():
                p.fill_(float("nan"))
        return real(run, loss)
    monkeypatch.setattr(harness.Run, "log", poisoned)
    argv = tiny(name, fake_mnist, tmp_path / "run", "--log-every", "1000")  # the loss is not looked at before a save
    assert run_main(mod, argv) == 1
    one_line_error(capsys, "weights are NaN/inf at step 16", "nothing saved")
    assert not (tmp_path / "run" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------- signals and kills (subprocesses)
@SCRIPTS
def test_sigterm_then_the_printed_command_resumes_the_same_run(name, fake_mnist, tmp_path):
    out = tmp_path / "run dir"  # a space: the printed command quotes it
    p = start(name, tiny(name, fake_mnist, out, "--epochs", "3", "--max-steps", "40", "--num-samples", "6",
                         "--cfg-scales", "2"))
    wait_for(p, "epoch 1/3 step 3/40")
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 143 and err == "error: terminated\n", err
    cmd = rest.strip().splitlines()[-1].strip()
    assert cmd == f"python {name}.py --resume={shlex.quote(str(out / 'ckpt.pt'))}"
    assert run_main(MODS[name], shlex.split(cmd)[2:]) == 0
    assert load(out / "ckpt.pt")["step"] == 40
    assert (out / "grid_e003_cfg2.png").exists()
    s = np.load(out / "samples.npz")
    assert len(s["x"]) == 6 and int(s["sample_steps"]) == 2  # the run's flags
    assert float(s["cfg_scale"]) == 1.5  # --sample-cfg's default, whatever the grids' --cfg-scales


@SCRIPTS
@pytest.mark.parametrize("mode", ["after training", "sample-only"])
def test_ctrl_c_while_sampling_stops_with_130(name, mode, trained, fake_mnist, tmp_path):
    out = tmp_path / "o"
    if mode == "sample-only":
        argv = ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out)]
    else:
        argv = tiny(name, fake_mnist, out, "--max-steps", "2")
    p = start(name, argv + ["--num-samples", "50000"])
    if mode == "sample-only":
        while not out.exists() and p.poll() is None:
            time.sleep(0.1)
    else:
        wait_for(p, "epoch 1/")
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert err == "error: interrupted\n"


KILL_MID_SAVE = """
import os, signal, sys, torch
real, n = torch.save, [0]
def dying_save(obj, f):
    n[0] += 1
    if n[0] == 2:  # the second checkpoint: write part of it, then die as if killed
        f.write(b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    real(obj, f)
torch.save = dying_save
mod = __import__(sys.argv[1])
mod.main(sys.argv[2:])
"""


@SCRIPTS
def test_kill_mid_save_keeps_the_previous_checkpoint(name, fake_mnist, tmp_path):
    out = tmp_path / "run"
    argv = tiny(name, fake_mnist, out, "--epochs", "3", "--sample-steps", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, name, *argv], capture_output=True, text=True,
                       timeout=120, cwd=HERE, env=env)
    assert r.returncode == -9, r.stderr[-2000:]
    assert load(out / "ckpt.pt")["step"] == 16  # the first checkpoint kept
    assert [f for f in os.listdir(out) if ".tmp" in f]  # the second one's partial temp file
    assert run_main(MODS[name], ["--resume", str(out / "ckpt.pt"), "--max-steps", "18"]) == 0
    assert load(out / "ckpt.pt")["step"] == 18


def test_torchrun_two_processes(fake_mnist, tmp_path):
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = tiny("dit_ddpm", fake_mnist, out, "--max-steps", "3")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*torchrun, "dit_ddpm.py", *argv], capture_output=True, text=True, timeout=240, cwd=HERE,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 process(es) x batch 16" in r.stdout
    assert r.stdout.count("done;") == 1  # only rank 0 reports and writes
    assert sorted(os.listdir(out)) == ["ckpt.pt", "denoise_e001.gif", "grid_e001_cfg1.png", "loss.csv", "loss.png"]
    assert load(out / "ckpt.pt")["step"] == 3


# ----------------------------------------------------------------------------- speed
def test_compile_runs_and_saves_plain_weights(fake_mnist, tmp_path):
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler (g++/clang++), none on PATH")
    out = tmp_path / "run"
    assert run_main(dit_ddpm, tiny("dit_ddpm", fake_mnist, out, "--max-steps", "2", "--compile")) == 0
    ck = load(out / "ckpt.pt")
    assert ck["step"] == 2
    assert not any(k.startswith("_orig_mod") for k in ck["model"])


@SCRIPTS
def test_bench_prints_throughput_and_writes_nothing(name, tmp_path, capsys):
    bench.main([name, "--steps", "2", *tiny(name, "unused", tmp_path / "o")])
    text = capsys.readouterr().out
    assert "img/s" in text and "GFLOP/img" in text and "100 samples" in text
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["dit_ddpm", "dit_flow"])
def test_bench_compares_the_written_out_attention_with_the_fused_module(name, tmp_path, capsys):
    bench.main([name, "--steps", "1", "--compare-attention", *tiny(name, "unused", tmp_path / "o")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attention written out ") and lines[1].startswith("attention nn.MultiheadAttention ")
    assert lines[2].startswith("written out / nn.MultiheadAttention speed: ")
    assert not (tmp_path / "o").exists()
