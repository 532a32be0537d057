"""The faults the README promises to catch, each over the scripts it applies to: data the loader checks, edited
checkpoints, flags that combine badly, a run folder that one run holds, guarded writes, stops by signal. The data is
written here."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import harness
import evaluate
from conftest import fake_images, run_main, write_idx
from test_smoke import HERE, MODS, SCRIPTS, SIZE, load, one_line_error, start, tiny

DEST = {"dit_ddpm": "hidden_size", "dit_flow": "hidden_size", "ddpm_unet": "base_channels"}  # SIZE's attribute


@pytest.fixture(scope="module")
def trained(fake_mnist, tmp_path_factory):
    """A 2-step checkpoint of each script."""
    root = tmp_path_factory.mktemp("trained")
    for name, mod in MODS.items():
        assert run_main(mod, tiny(name, fake_mnist, root / name, "--max-steps", "2")) == 0
    return {name: str(root / name / "ckpt.pt") for name in MODS}


def no_temp_files(folder):
    return not [f for f in os.listdir(folder) if ".tmp" in f]


def dead_pid():
    """The PID of a process that has ended (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------- data the loader checks (1-4)
DATA_FAULTS = {  # kind -> words of the error
    "label K": "holds labels 0..10; mnist has labels 0..9",
    "label 255": "holds labels 0..255",
    "32x32 images": "holds 32x32x1 images; mnist is 28x28x1",
    "14x14 images": "holds 14x14x1 images",
    "short labels": "holds 64 images but 60 labels",
}


def mnist_with(root, kind):
    """A --data-dir whose MNIST training split (64 images) has the fault `kind`; its test split is good."""
    x, y = fake_images(64)
    if kind.startswith("label"):
        y[5] = int(kind.split()[1].replace("K", "10"))
    if kind.endswith("images"):
        x = fake_images(64, size=32)[0] if kind.startswith("32") else x[:, ::2, ::2]
    if kind == "short labels":
        y = y[:60]
    write_idx(root / "MNIST" / "raw", "train", x, y)
    write_idx(root / "MNIST" / "raw", "t10k", *fake_images(64, seed=1))
    return str(root)


@SCRIPTS
@pytest.mark.parametrize("kind", list(DATA_FAULTS))
def test_bad_data_is_one_line_before_anything_is_written(name, kind, tmp_path, capsys):
    assert run_main(MODS[name], tiny(name, mnist_with(tmp_path / "d", kind), tmp_path / "o")) == 2
    one_line_error(capsys, "the training split of mnist in", DATA_FAULTS[kind])
    assert not (tmp_path / "o").exists()


def evaluate_argv(tmp_path, data, *extra):
    np.savez(tmp_path / "s.npz", x=np.full((8, 1, 28, 28), 0.5, np.float32))
    return [str(tmp_path / "s.npz"), "--data-dir", data, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu",
            "--classifier-epochs", "1", *extra]


@pytest.mark.parametrize("kind", ["label K", "label 255"])
def test_evaluate_refuses_bad_labels_before_training(kind, tmp_path, capsys):
    assert harness.cli(evaluate.main, evaluate_argv(tmp_path, mnist_with(tmp_path / "d", kind))) == 2
    one_line_error(capsys, DATA_FAULTS[kind])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s.eval.json").exists()


def test_evaluate_seed_is_the_scripts_seed(fake_mnist, tmp_path, capsys):  # 13
    assert harness.cli(evaluate.main, evaluate_argv(tmp_path, fake_mnist, "--seed", "1" + "0" * 23)) == 2
    one_line_error(capsys, "argument --seed: must be >= 0 and < 4294967296")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s.eval.json").exists()


# ----------------------------------------------------------------------------- checkpoints that load (5-8)
def pickled(obj, path):
    """A plain pickle.dump file, not torch.save's format."""
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def without(ck, key):
    return {k: v for k, v in ck.items() if k != key}


def with_flag(ck, key, value):
    return {**ck, "args": {**ck["args"], key: value}}


BAD_CKPTS = {  # kind -> (write the bad file from the checkpoint's dict and the script's name, words of the error)
    "a tensor": (lambda ck, n, p: torch.save(torch.zeros(3), p), "was written by another program"),
    "a number": (lambda ck, n, p: torch.save(5, p), "was written by another program"),
    "no loss_log": (lambda ck, n, p: torch.save(without(ck, "loss_log"), p), "lacks loss_log"),
    "no loss_acc": (lambda ck, n, p: torch.save(without(ck, "loss_acc"), p), "lacks loss_acc"),
    "empty rng": (lambda ck, n, p: torch.save({**ck, "rng": []}, p), "bad rng: it must be a non-empty list"),
    "step a string": (lambda ck, n, p: torch.save({**ck, "step": "10"}, p), "bad step: it must be a whole number"),
    "args a list": (lambda ck, n, p: torch.save({**ck, "args": list(ck["args"])}, p), "bad args"),
    "unknown dataset": (lambda ck, n, p: torch.save(with_flag(ck, "dataset", "cifar100"), p),
                        "bad flag: argument --dataset: invalid choice: 'cifar100'"),
    "size -8": (lambda ck, n, p: torch.save(with_flag(ck, DEST[n], -8), p), "must be >= 1 (got -8)"),
    "unknown flag": (lambda ck, n, p: torch.save(with_flag(ck, "colour", 1), p), "'colour', which this script"),
    "plain pickle": (lambda ck, n, p: pickled({"script": n, "step": 1}, p), "truncated or corrupt"),
}


@SCRIPTS
@pytest.mark.parametrize("kind", list(BAD_CKPTS))
def test_bad_checkpoint_fields_and_flags_are_one_line(name, kind, trained, tmp_path, capsys):
    make, words = BAD_CKPTS[kind]
    make(load(trained[name]), name, tmp_path / "bad.pt")
    for argv in (["--resume", str(tmp_path / "bad.pt")], ["--sample-only", "--ckpt", str(tmp_path / "bad.pt")]):
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            assert run_main(MODS[name], argv + ["--out-dir", str(tmp_path / "o")]) == 2
        one_line_error(capsys, words)
        assert not warned  # a warning is more lines on stderr
    assert not (tmp_path / "o").exists()


def test_a_plain_pickle_is_one_line_on_the_command_line(tmp_path):
    pickled({"script": "dit_ddpm", "step": 1}, tmp_path / "p.pt")
    r = subprocess.run([sys.executable, "dit_ddpm.py", "--resume", str(tmp_path / "p.pt")], capture_output=True,
                       text=True, cwd=HERE, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "truncated or corrupt" in r.stderr, r.stderr


@SCRIPTS
def test_a_checkpoints_flag_fails_exactly_like_the_typed_flag(name, trained, tmp_path, capsys):
    assert run_main(MODS[name], tiny(name, "unused", tmp_path / "o", SIZE[name], "-8")) == 2
    typed = capsys.readouterr().err.removeprefix("error: ")
    torch.save(with_flag(load(trained[name]), DEST[name], -8), tmp_path / "bad.pt")
    assert run_main(MODS[name], ["--resume", str(tmp_path / "bad.pt")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {tmp_path / 'bad.pt'} holds a bad flag: {typed}"


# ----------------------------------------------------------------------------- flags that combine badly (9, 10, 12)
@SCRIPTS
def test_resume_beside_ckpt_is_refused(name, trained, tmp_path, capsys):  # 9
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(trained[name], b / "ckpt.pt")
    for extra in (["--sample-only", "--ckpt", trained[name]], ["--ckpt", trained[name]]):
        assert run_main(MODS[name], ["--resume", str(b / "ckpt.pt"), *extra]) == 2
        one_line_error(capsys, "--resume PATH continues a run", "give one of them")
    assert os.listdir(b) == ["ckpt.pt"] and load(b / "ckpt.pt")["step"] == 2


@SCRIPTS
def test_resume_into_another_runs_folder_is_refused(name, trained, tmp_path, capsys):  # 10
    other, own = tmp_path / "other", tmp_path / "own"
    for d in (other, own):
        d.mkdir()
        shutil.copy(trained[name], d / "ckpt.pt")
    before = (other / "ckpt.pt").read_bytes()
    assert run_main(MODS[name], ["--resume", trained[name], "--out-dir", str(other), "--max-steps", "3"]) == 2
    one_line_error(capsys, f"--out-dir {other} holds another run than --resume")
    assert os.listdir(other) == ["ckpt.pt"] and (other / "ckpt.pt").read_bytes() == before
    # the checkpoint's own folder, however it is spelled, is its own run
    argv = ["--resume", str(own / "ckpt.pt"), "--out-dir", f"{own}/../own", "--max-steps", "3"]
    assert run_main(MODS[name], argv) == 0
    assert load(own / "ckpt.pt")["step"] == 3


@SCRIPTS
def test_too_many_samples_are_refused_before_anything_is_written(name, trained, fake_mnist, tmp_path, capsys):  # 12
    out = tmp_path / "o"
    assert run_main(MODS[name], tiny(name, fake_mnist, out, "--num-samples", "1000000000000")) == 2
    one_line_error(capsys, "argument --num-samples: must be <= 1000000 (got 1000000000000)")
    argv = ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out), "--num-samples", "1000001"]
    assert run_main(MODS[name], argv) == 2
    one_line_error(capsys, "--num-samples: must be <= 1000000")
    assert not out.exists()


# ----------------------------------------------------------------------------- a folder one run holds (11)
@SCRIPTS
def test_a_held_folder_is_refused_and_a_stale_lock_taken_over(name, trained, fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained[name], out / "ckpt.pt")
    (out / ".lock").write_text(str(os.getppid()))  # a live process, not this one: a run using the folder
    for argv in (tiny(name, fake_mnist, out), ["--resume", str(out / "ckpt.pt")],
                 ["--sample-only", "--ckpt", str(out / "ckpt.pt")]):
        assert run_main(MODS[name], argv) == 2
        one_line_error(capsys, f"--out-dir {out} is in use by a running run (pid {os.getppid()})")
    assert sorted(os.listdir(out)) == [".lock", "ckpt.pt"]
    (out / ".lock").write_text(str(dead_pid()))  # left by a killed run, with its half-written checkpoint
    (out / "ckpt.pt.tmp4194305").write_bytes(b"partial")
    assert run_main(MODS[name], ["--resume", str(out / "ckpt.pt"), "--max-steps", "3"]) == 0
    assert load(out / "ckpt.pt")["step"] == 3 and no_temp_files(out) and not (out / ".lock").exists()


def test_two_runs_started_together_into_one_folder(fake_mnist, tmp_path):
    out = tmp_path / "run"
    runs = [start("dit_ddpm", tiny("dit_ddpm", fake_mnist, out, "--max-steps", "16")) for _ in range(2)]
    errs = [p.communicate(timeout=240)[1] for p in runs]
    assert sorted(p.returncode for p in runs) == [0, 2], errs
    (err,) = [e for p, e in zip(runs, errs) if p.returncode == 2]
    assert err.count("\n") == 1 and ("is in use by a running run" in err or "already holds a run" in err), err
    assert load(out / "ckpt.pt")["step"] == 16 and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- writes (14)
@SCRIPTS
@pytest.mark.parametrize("what", ["grid_e001_cfg1.png", "denoise_e001.gif", "loss.png", "loss.csv"])
def test_a_failed_image_or_loss_write_is_one_line_and_exit_1(name, what, fake_mnist, tmp_path, capsys):
    out = tmp_path / "run"
    (out / what).mkdir(parents=True)  # a folder in the way: the write fails
    assert run_main(MODS[name], tiny(name, fake_mnist, out, "--max-steps", "2")) == 1
    one_line_error(capsys, f"could not write {out / what}")
    assert load(out / "ckpt.pt")["step"] == 2 and no_temp_files(out) and not (out / ".lock").exists()


@SCRIPTS
def test_a_full_disk_while_writing_a_grid_keeps_the_checkpoint(name, fake_mnist, tmp_path, capsys, monkeypatch):
    real = Image.Image.save

    def full_disk(img, f, *args, **kw):
        if "grid_" in os.path.basename(getattr(f, "name", str(f))):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(img, f, *args, **kw)
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "run"
    assert run_main(MODS[name], tiny(name, fake_mnist, out, "--max-steps", "2")) == 1
    one_line_error(capsys, f"could not write {out / 'grid_e001_cfg1.png'}", "No space left on device")
    assert load(out / "ckpt.pt")["step"] == 2 and no_temp_files(out) and not (out / "grid_e001_cfg1.png").exists()


def test_dit_flow_a_failed_write_of_its_patterns_figure_is_one_line_and_exit_1(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "compare_e001.png").mkdir(parents=True)
    argv = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--sample-steps", "2",
            "--max-steps", "2", "--cfg-scales", "1", "--out-dir", str(out), "--device", "cpu"]
    assert run_main(MODS["dit_flow"], argv) == 1
    one_line_error(capsys, "compare_e001.png")
    assert load(out / "ckpt.pt")["step"] == 2 and not (out / ".lock").exists()


def test_evaluate_a_failed_result_write_is_one_line_and_exit_1(fake_mnist, tmp_path, capsys, monkeypatch):
    def scores(*args):  # what the metrics return; meanwhile the file's place is taken
        (tmp_path / "s.eval.json").mkdir()
        return {"fid": 1.0, "fid_floor": 1.0, "fid_floor_sd": 0.0, "n_floor": 8, "class_accuracy": None,
                "precision": 1.0, "recall": 1.0, "n_pr": 8}
    monkeypatch.setattr(evaluate, "get_classifier", lambda *args: (None, 1.0, "cache.pt"))
    monkeypatch.setattr(evaluate, "evaluate", scores)
    assert harness.cli(evaluate.main, evaluate_argv(tmp_path, fake_mnist)) == 1
    one_line_error(capsys, f"could not write {tmp_path / 's.eval.json'}")
    assert no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- signals (15 and the exit codes)
@SCRIPTS
@pytest.mark.parametrize("sig, during", [(signal.SIGINT, "save_checkpoint"), (signal.SIGTERM, "save_samples")])
def test_a_signal_during_the_last_save_stops_the_run(name, sig, during, fake_mnist, tmp_path, capsys, monkeypatch):
    """After the last loss.csv row: what is saved stays, one line, 130 / 143, no final sampling; resuming samples."""
    mod, out = MODS[name], tmp_path / "run"
    where = harness if during == "save_checkpoint" else mod  # the run's books save the checkpoint, the script grids
    real = getattr(where, during)

    def signalled(*args, **kw):
        signal.raise_signal(sig)  # the training loop's handler notes it
        return real(*args, **kw)
    monkeypatch.setattr(where, during, signalled)
    assert run_main(mod, tiny(name, fake_mnist, out, "--max-steps", "2", "--num-samples", "3")) == 128 + sig
    printed = capsys.readouterr()
    assert printed.err == f"error: {harness.STOPS[sig]}\n" and "resume with" in printed.out
    assert load(out / "ckpt.pt")["step"] == 2 and (out / "grid_e001_cfg1.png").exists()
    assert not (out / "samples.npz").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    assert run_main(mod, ["--resume", str(out / "ckpt.pt")]) == 0 and len(np.load(out / "samples.npz")["x"]) == 3


@SCRIPTS
def test_sigterm_while_sampling_only_is_one_line_and_143(name, trained, tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kw):
        assert signal.getsignal(signal.SIGTERM) is harness.interrupt  # else SIGTERM would end pytest itself
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(MODS[name], "write_npz", terminated)
    out = tmp_path / "o"
    assert run_main(MODS[name], ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out),
                                 "--num-samples", "5"]) == 143
    assert capsys.readouterr().err == "error: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- the loop: learning rate and EMA
@SCRIPTS
def test_a_warmup_longer_than_the_run_is_cut_to_half_of_it_and_the_ema_warms_up(name, fake_mnist, tmp_path,
                                                                                 monkeypatch):
    """The learning rate of each optimiser step: warm-up over min(--warmup-steps, half the run), then cosine decay to
    0 at the run's end; after the first step the EMA is 0.1 w0 + 0.9 w1 (its decay warms up as (1+step)/(10+step))."""
    lrs = []
    real = torch.optim.AdamW.step

    def spy(opt, *args, **kw):
        lrs.append(opt.param_groups[0]["lr"] / 1e-3)
        return real(opt, *args, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    assert run_main(MODS[name], tiny(name, fake_mnist, tmp_path / "a", "--max-steps", "8", "--lr", "1e-3",
                                     "--warmup-steps", "200")) == 0
    cosine = [0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0] + cosine)  # warm-up over 4 steps, not 200
    lrs.clear()
    assert run_main(MODS[name], tiny(name, fake_mnist, tmp_path / "b", "--max-steps", "8", "--lr", "1e-3",
                                     "--warmup-steps", "2")) == 0
    assert lrs == pytest.approx([0.5, 1.0] + [0.5 * (1 + np.cos(np.pi * k / 6)) for k in range(6)])
    monkeypatch.undo()
    assert run_main(MODS[name], tiny(name, fake_mnist, tmp_path / "c", "--max-steps", "1")) == 0
    ck = load(tmp_path / "c" / "ckpt.pt")
    a = harness.parse_args(MODS[name].get_parser, ["--resume", str(tmp_path / "c" / "ckpt.pt")], {}, name)[0]
    torch.manual_seed(a.seed)
    w0 = MODS[name].build(a, torch.device("cpu"))[0].state_dict()
    for k, w1 in ck["model"].items():
        assert torch.allclose(ck["ema"][k], 0.1 * w0[k] + 0.9 * w1, atol=1e-6), k


# ----------------------------------------------------------------------------- curve.py and evaluate.py's cache
import contextlib  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import types  # noqa: E402
import urllib.request  # noqa: E402

import curve  # noqa: E402

HEADER = ",".join(curve.FIELDS) + "\n"


def no_runs(monkeypatch):
    """Neither curve.py's timing nor any child process may start."""
    def never(*args, **kw):
        raise AssertionError("curve.py started a process")
    monkeypatch.setattr(curve, "images_per_second", untimed)
    monkeypatch.setattr(subprocess, "Popen", never)


def untimed(script):
    raise AssertionError("curve.py timed the model")


def offline(*args, **kw):
    raise OSError("network is unreachable")


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-5"])
def test_curve_refuses_a_bad_budget_in_one_line(value, fake_mnist, tmp_path, capsys, monkeypatch):
    no_runs(monkeypatch)
    out = tmp_path / "curve"
    assert run_main(curve, ["--minutes", "1", value, "--data-dir", fake_mnist, "--out-dir", str(out)]) == 2
    one_line_error(capsys, f"argument --minutes: must be > 0 and < 10080 (got {value})")
    assert not out.exists()


def test_curve_a_bad_budget_on_the_command_line_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "curve.py", "--minutes", "nan", "--out-dir", str(tmp_path / "c")],
                       capture_output=True, text=True, cwd=HERE, check=False)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == "error: argument --minutes: must be > 0 and < " \
                                                                "10080 (got nan)\n", r.stderr


@pytest.mark.parametrize("kind, words", [("missing", "mnist not found in"), ("label K", DATA_FAULTS["label K"])])
def test_curve_bad_data_is_one_line_before_any_training(kind, words, tmp_path, capsys, monkeypatch):
    no_runs(monkeypatch)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "d"
    data.mkdir()
    if kind != "missing":
        mnist_with(data, kind)
    out = tmp_path / "curve"
    assert run_main(curve, ["--minutes", "1", "--data-dir", str(data), "--out-dir", str(out)]) == 2
    one_line_error(capsys, words, "MNIST/raw")
    assert not out.exists()


def test_curve_a_failed_child_is_its_own_last_line_and_exit_code(capsys):
    def main(code):
        with curve.Stops() as stops:
            stops.run([sys.executable, "-c", code])
    fails = "import sys; print('working'); sys.stderr.write('a warning\\nerror: it broke\\n\\n'); sys.exit(3)"
    assert run_main(types.SimpleNamespace(main=main), fails) == 3
    assert capsys.readouterr().err == "error: it broke\n"
    killed = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert run_main(types.SimpleNamespace(main=main), killed) == 128 + signal.SIGKILL
    one_line_error(capsys, "was killed by signal 9")


def test_curve_a_script_that_refuses_to_run_is_its_line_not_a_traceback(fake_mnist, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(curve, "images_per_second", lambda script: (100.0, 32))
    out = tmp_path / "curve"
    (out / "dit_ddpm_1min").mkdir(parents=True)
    (out / "dit_ddpm_1min" / ".lock").write_text(str(os.getppid()))  # a live process: a run using the folder
    argv = ["--minutes", "1", "--scripts", "dit_ddpm", "--data-dir", fake_mnist, "--out-dir", str(out)]
    assert run_main(curve, argv) == 2
    one_line_error(capsys, f"--out-dir {out / 'dit_ddpm_1min'} is in use by a running run (pid {os.getppid()})")
    assert not (out / "curve.csv").exists()


def test_curve_rerun_skips_scored_points_scores_trained_ones_and_refuses_stopped_ones(fake_mnist, tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.setattr(curve, "images_per_second", untimed)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for evaluate.py, the process curve.py starts
    out = tmp_path / "curve"
    (out / "dit_ddpm_1min").mkdir(parents=True)
    (out / "dit_ddpm_1min" / "ckpt.pt").write_bytes(b"a finished run")
    (out / "curve.csv").write_text(HEADER + "dit_ddpm,1.0,188,61.5,0.9,30.0,0.8,0.7\n")
    trained = out / "dit_ddpm_2min"  # trained, not scored (evaluate.py failed or was stopped)
    trained.mkdir()
    (trained / "ckpt.pt").write_bytes(b"a finished run")
    (trained / "curve.log").write_text("training ...\ntrained 375 steps in 121.5 s (with checkpoints and grids)\n")
    x, y = fake_images(20, seed=3)
    np.savez(trained / "samples.npz", x=x.transpose(0, 3, 1, 2).astype(np.float32) / 255, y=y.astype(np.int64))
    argv = ["--scripts", "dit_ddpm", "dit_ddpm", "--data-dir", fake_mnist, "--out-dir", str(out),
            "--cache-dir", str(tmp_path / "cache")]
    assert run_main(curve, argv + ["--minutes", "1", "2", "2.0"]) == 0
    printed = capsys.readouterr().out
    assert "dit_ddpm 1 min: in" in printed and "skipped" in printed and "trained before" in printed
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert [(r["minutes_asked"], r["steps"], r["train_seconds"]) for r in rows] == [("1.0", "188", "61.5"),
                                                                                    ("2.0", "375", "121.5")]
    assert json.load(open(trained / "samples.eval.json"))["n_samples"] == 20 and (out / "curve.png").exists()

    stopped = out / "dit_ddpm_5min"  # a run that did not finish: no curve.log
    stopped.mkdir()
    (stopped / "ckpt.pt").write_bytes(b"a stopped run")
    no_runs(monkeypatch)
    assert run_main(curve, argv + ["--minutes", "1", "2", "5", "10"]) == 2
    one_line_error(capsys, f"{stopped} holds a run that is not in {out / 'curve.csv'}", "remove that folder")
    assert len(list(csv.DictReader(open(out / "curve.csv")))) == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_curve_passes_a_stop_on_to_its_run_which_saves_then_exits_130_or_143(sig, tmp_path, capsys):
    data = tmp_path / "d"  # 2048 images: 64 steps an epoch at the quick batch of 32, so the stop comes mid-epoch
    write_idx(data / "MNIST" / "raw", "train", *fake_images(2048))
    write_idx(data / "MNIST" / "raw", "t10k", *fake_images(64, seed=1))
    out = tmp_path / "curve"
    timed = "import sys, curve; curve.images_per_second = lambda s: (100.0, 32); sys.exit(curve.cli(curve.main))"
    p = subprocess.Popen([sys.executable, "-c", timed, "--minutes", "1", "--scripts", "dit_ddpm", "--data-dir",
                          str(data), "--out-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lock = out / "dit_ddpm_1min" / ".lock"
    watchdog = threading.Timer(180, p.kill)
    watchdog.start()
    try:
        for line in p.stdout:  # curve.py echoes its run's progress lines
            if "step 50/188 " in line:
                break
        else:
            raise AssertionError(f"no progress line from the run: {p.stderr.read()[-2000:]}")
        p.send_signal(sig)  # to curve.py alone, as kill PID does; a terminal's Ctrl-C reaches it the same way
        rest, err = p.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if p.poll() is None or lock.exists():  # a failure: end the run curve.py started, not left running
            p.kill()
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(lock.read_text()), signal.SIGKILL)
    assert p.returncode == 128 + sig and err == f"error: {'interrupted' if sig == signal.SIGINT else 'terminated'}\n"
    assert f"stopped: {out / 'dit_ddpm_1min'} keeps the run" in rest
    assert 50 <= load(out / "dit_ddpm_1min" / "ckpt.pt")["step"] < 188  # saved at the step it reached
    assert not lock.exists() and not (out / "curve.csv").exists()
    assert run_main(curve, ["--minutes", "1", "--scripts", "dit_ddpm", "--data-dir", str(data), "--out-dir",
                            str(out)]) == 2  # a rerun: one line naming the folder to remove
    one_line_error(capsys, f"{out / 'dit_ddpm_1min'} holds a run", "remove that folder")


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "curve.csv does not exist"),
    (lambda p: p.write_text(HEADER), "holds no runs (its header only)"),
    (lambda p: p.write_text(HEADER + "dit_ddpm,1,188,61.5,,30,0.8,0.7\n"), "line 2: class_accuracy is empty"),
    (lambda p: p.write_text(HEADER + "dit_ddpm,1,188,61.5,0.9,30\n"), "line 2: precision is empty"),
    (lambda p: p.write_text(HEADER + "dit_ddpm,1,188,61.5,0.9,abc,0.8,0.7\n"), "fid is 'abc', not a number"),
    (lambda p: p.write_text(HEADER + "dit_ddpm,1,188,61.5,0.9,nan,0.8,0.7\n"), "fid is nan"),
    (lambda p: p.write_text(HEADER + "unet,1,188,61.5,0.9,30,0.8,0.7\n"), "script 'unet' is not one of"),
    (lambda p: p.write_text("a,b\n1,2\n"), "has the columns a,b"),
])
def test_curve_plot_only_refuses_an_unreadable_csv_in_one_line(make, words, tmp_path, capsys, monkeypatch):
    no_runs(monkeypatch)
    make(tmp_path / "curve.csv")
    assert run_main(curve, ["--plot-only", "--out-dir", str(tmp_path)]) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "curve.png").exists()


def test_evaluate_other_data_of_the_same_size_trains_its_own_classifier(tmp_path, capsys, monkeypatch):
    """The cache key is the data's content: other images of the same count are not scored by the first data's
    classifier; the same data in another folder is."""
    monkeypatch.setattr(evaluate, "evaluate", lambda *args: {  # the metrics are not what is tested here
        "fid": 1.0, "fid_floor": 1.0, "fid_floor_sd": 0.0, "n_floor": 8, "class_accuracy": None, "precision": 1.0,
        "recall": 1.0, "n_pr": 8})
    for name, seed in (("a", 0), ("b", 7)):
        write_idx(tmp_path / name / "MNIST" / "raw", "train", *fake_images(256, seed=seed))
        write_idx(tmp_path / name / "MNIST" / "raw", "t10k", *fake_images(64, seed=1))
    shutil.copytree(tmp_path / "a", tmp_path / "a copy")
    cache = tmp_path / "cache"
    np.savez(tmp_path / "s.npz", x=np.full((8, 1, 28, 28), 0.5, np.float32))
    for data, words, files in (("a", "training the classifier", 1), ("b", "training the classifier", 2),
                               ("a copy", "classifier: cached", 2)):
        argv = [str(tmp_path / "s.npz"), "--data-dir", str(tmp_path / data), "--cache-dir", str(cache),
                "--device", "cpu", "--classifier-epochs", "1"]
        assert run_main(evaluate, argv) == 0
        assert words in capsys.readouterr().out, data
        assert len(os.listdir(cache)) == files, data


# ----------------------------------------------------------------------------- bench.py
import bench  # noqa: E402

BENCH = {"dit_ddpm": ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--timesteps", "20"],
         "dit_flow": ["--dataset", "mnist", "--hidden-size", "32", "--depth", "1", "--num-heads", "2"],
         "ddpm_unet": ["--base-channels", "8", "--num-res-blocks", "1", "--timesteps", "20"]}
BENCH_RUN = ["--batch-size", "4", "--sample-steps", "2", "--device", "cpu"]


@pytest.mark.parametrize("argv, words", [
    (["dit_ddpm", "--steps", "0"], "argument --steps: must be >= 1 (got 0)"),
    (["dit_ddpm", "--steps", "-3"], "argument --steps: must be >= 1 (got -3)"),
    (["dit_ddpm", "--compare", "--ref-sample-steps", "0"], "argument --ref-sample-steps: must be >= 1 (got 0)"),
    (["ddpm_unet", "--compare"], "--compare is for dit_ddpm only, not ddpm_unet"),
    (["dit_flow", "--compare"], "--compare is for dit_ddpm only, not dit_flow"),
    (["ddpm_unet", "--compare-attention"], "--compare-attention is for dit_ddpm and dit_flow only"),
    (["dit_ddpm", "--compare", "--compare-attention"], "--compare-attention: not allowed with argument --compare"),
    (["dit_ddpm", "--bogus"], "unrecognized arguments: --bogus"),
    (["dit_ddpm", "--num-heads", "3"], "--hidden-size must be a multiple of 4 and of --num-heads"),
    (["dit_flow", "--patch-size", "5"], "--patch-size must divide 28"),
    (["ddpm_unet", "--base-channels", "6"], "--base-channels must be a multiple of 4"),
])
def test_bench_refuses_bad_input_in_one_line_before_building_a_model(argv, words, capsys, monkeypatch):
    for mod in MODS.values():
        monkeypatch.setattr(mod, "build", lambda *_: pytest.fail("a model was built"))
    assert harness.cli(bench.main, argv[:1] + BENCH[argv[0]] + argv[1:] + BENCH_RUN) == 2
    one_line_error(capsys, words)


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: script"),
    (["unet", "--device", "cpu"], "argument script: invalid choice: 'unet'"),
    (["--steps", "abc", "dit_ddpm"], "argument --steps:"),
])
def test_bench_refuses_a_missing_or_unknown_script_or_a_bad_count_in_one_line(argv, words, capsys):
    assert harness.cli(bench.main, argv) == 2
    one_line_error(capsys, words)


def test_bench_compare_takes_a_single_timed_step(capsys):
    argv = ["dit_ddpm", "--compare", "--steps", "1", "--ref-sample-steps", "1", *BENCH["dit_ddpm"], *BENCH_RUN]
    assert harness.cli(bench.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("train step   reference ") and "(timed 1 steps)" in lines[2], lines


def test_bench_names_an_unconditional_unet_s_sampling_unguided(capsys):
    assert harness.cli(bench.main, ["ddpm_unet", "--steps", "1", *BENCH["ddpm_unet"], *BENCH_RUN]) == 0
    assert "100 samples, unconditional, " in capsys.readouterr().out


# ----------------------------------------------------------------------------- round three: silent wrong results
@SCRIPTS
def test_optimiser_flags_beside_resume_act(name, trained, tmp_path):  # 1
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained[name], out / "ckpt.pt")
    extra = ["--beta2", "0.5"] if name != "ddpm_unet" else []  # the UNet's AdamW keeps torch's betas
    argv = ["--resume", str(out / "ckpt.pt"), "--max-steps", "3", "--weight-decay", "0.3", *extra]
    assert run_main(MODS[name], argv) == 0
    ck = load(out / "ckpt.pt")
    (group,) = ck["opt"]["param_groups"]
    assert group["weight_decay"] == 0.3 == ck["args"]["weight_decay"]
    if extra:
        assert tuple(group["betas"]) == (0.9, 0.5) and ck["args"]["beta2"] == 0.5
    assert ck["step"] == 3 and ck["opt"]["state"]  # the moments came with the resume


@SCRIPTS
def test_epochs_beside_resume_set_the_length_of_a_run_trained_by_steps(name, trained, tmp_path, capsys):  # 2
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained[name], out / "ckpt.pt")  # trained with --max-steps 2; 16 steps an epoch
    assert run_main(MODS[name], ["--resume", str(out / "ckpt.pt"), "--epochs", "2"]) == 0
    assert "trained 30 steps" in capsys.readouterr().out
    assert load(out / "ckpt.pt")["step"] == 32


@SCRIPTS
@pytest.mark.parametrize("mode", ["--resume", "--ckpt"])
def test_a_weights_flag_other_than_the_checkpoints_is_refused(name, mode, trained, tmp_path, capsys):  # 3
    flag, value = {"dit_ddpm": ("--num-heads", "4"), "dit_flow": ("--num-heads", "4"),
                   "ddpm_unet": ("--schedule", "linear")}[name]  # the weights fit, their meaning does not
    argv = [mode, trained[name], flag, value, "--out-dir", str(tmp_path / "o"), "--num-samples", "2"]
    assert run_main(MODS[name], argv + ["--sample-only"] * (mode == "--ckpt")) == 2
    one_line_error(capsys, f"{flag} {value}: the weights of {trained[name]} were trained with {flag}")
    assert not (tmp_path / "o").exists()


@SCRIPTS
def test_sampling_never_writes_nan(name, trained, tmp_path, capsys, monkeypatch):  # 4
    out = tmp_path / "o"
    for flag in ("--sample-cfg", "--cfg-scales"):
        argv = ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out), flag, "1e39"]
        assert run_main(MODS[name], argv) == 2
        one_line_error(capsys, f"argument {flag}: must be >= 0 and < 1000 (got 1e39)")
    real = MODS[name].write_npz

    def overflowing(draw, *args, **kw):  # what a huge scale does: inf - inf
        return real(lambda *a: (torch.full((len(a[0]), 1, 28, 28), float("nan")), []), *args, **kw)
    monkeypatch.setattr(MODS[name], "write_npz", overflowing)
    assert run_main(MODS[name], ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out),
                                 "--num-samples", "4"]) == 1
    one_line_error(capsys, "samples are NaN/inf", "samples.npz is not written")
    assert not (out / "samples.npz").exists()


@pytest.mark.parametrize("name", ["dit_ddpm", "ddpm_unet"])
def test_the_ancestral_samplers_eta_is_recorded_as_1(name, trained, tmp_path):  # 6
    out = tmp_path / "o"
    argv = ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out), "--num-samples", "2", "--sampler", "ddpm",
            "--eta", "0"]
    assert run_main(MODS[name], argv) == 0
    s = np.load(out / "samples.npz")
    assert float(s["eta"]) == 1.0 and int(s["sample_steps"]) == 20  # all T = 20 steps, η = 1


# ----------------------------------------------------------------------------- round three: files kept or redone
def test_a_users_temp_like_file_stays(fake_mnist, tmp_path):  # 7
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.tmp2024").write_text("mine")
    (out / "ckpt.pt.tmp4194305").write_bytes(b"partial")  # a killed run's: it goes
    assert run_main(MODS["dit_ddpm"], tiny("dit_ddpm", fake_mnist, out, "--max-steps", "2")) == 0
    assert (out / "notes.tmp2024").read_text() == "mine" and not (out / "ckpt.pt.tmp4194305").exists()


@SCRIPTS
def test_sample_only_into_another_runs_folder_is_refused(name, trained, tmp_path, capsys):  # 8
    other = tmp_path / "other"
    other.mkdir()
    (other / "ckpt.pt").write_bytes(b"another run")
    (other / "samples.npz").write_bytes(b"its samples")
    argv = ["--sample-only", "--ckpt", trained[name], "--out-dir", str(other), "--num-samples", "2"]
    assert run_main(MODS[name], argv) == 2
    one_line_error(capsys, f"--out-dir {other} holds another run than --ckpt {trained[name]}")
    assert (other / "samples.npz").read_bytes() == b"its samples"


def test_dit_flow_patterns_on_a_full_disk_leave_no_empty_file_and_name_it(tmp_path, capsys, monkeypatch):  # 9
    real = Image.Image.save

    def full_disk(img, f, *args, **kw):
        if "compare_" in os.path.basename(getattr(f, "name", str(f))):
            raise OSError(28, "No space left on device")
        return real(img, f, *args, **kw)
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "run"
    argv = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--sample-steps", "2",
            "--max-steps", "2", "--cfg-scales", "1", "--out-dir", str(out), "--device", "cpu"]
    assert run_main(MODS["dit_flow"], argv) == 1
    one_line_error(capsys, f"could not write {out / 'compare_e001.png'}", "No space left on device")
    assert not (out / "compare_e001.png").exists() and no_temp_files(out)
    monkeypatch.undo()
    (out / "metrics.csv").mkdir()  # metrics.csv: a failed write names it
    assert run_main(MODS["dit_flow"], ["--resume", str(out / "ckpt.pt"), "--max-steps", "3"]) == 1
    one_line_error(capsys, f"could not write {out / 'metrics.csv'}")


@SCRIPTS
def test_a_resume_redoes_the_images_a_failed_write_lost(name, fake_mnist, tmp_path, capsys):  # 10
    out = tmp_path / "run"
    (out / "denoise_e002.gif").mkdir(parents=True)  # the GIF of epoch 2 cannot be written
    assert run_main(MODS[name], tiny(name, fake_mnist, out, "--max-steps", "32")) == 1
    assert load(out / "ckpt.pt")["step"] == 32 and (out / "denoise_e001.gif").is_file()
    (out / "denoise_e002.gif").rmdir()
    capsys.readouterr()
    assert run_main(MODS[name], ["--resume", str(out / "ckpt.pt")]) == 0
    assert "trained 0 steps" in capsys.readouterr().out
    assert (out / "denoise_e002.gif").is_file() and (out / "grid_e002_cfg1.png").is_file()


@SCRIPTS
def test_a_refused_resume_from_elsewhere_creates_no_data_folder(name, trained, tmp_path, capsys, monkeypatch):  # 11
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained[name], out / "ckpt.pt")
    with_default_data = with_flag(load(out / "ckpt.pt"), "data_dir", "./data")
    torch.save(with_default_data, out / "ckpt.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_main(MODS[name], ["--resume", str(out / "ckpt.pt"), "--max-steps", "3"]) == 2
    one_line_error(capsys, "not found in ./data")
    assert os.listdir(elsewhere) == []


# ----------------------------------------------------------------------------- round three: one line, not a traceback
@pytest.mark.parametrize("length", [["--max-steps", "4"], ["--epochs", "1"]])
def test_dit_flow_patterns_with_a_batch_larger_than_the_set(length, tmp_path, capsys):  # 12
    argv = ["--hidden-size", "32", "--depth", "1", "--num-heads", "2", "--patch-size", "4", "--batch-size", "4000",
            "--out-dir", str(tmp_path / "o"), "--device", "cpu", *length]
    assert run_main(MODS["dit_flow"], argv) == 2
    one_line_error(capsys, "2000 training images are fewer than a step's 4000 x 1 process(es)")


@pytest.mark.parametrize("pid", ["2147483648", "9" * 20, "-5"])
def test_a_lock_holding_no_possible_pid_is_stale(pid, trained, tmp_path, capsys):  # 13
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(trained["dit_ddpm"], out / "ckpt.pt")
    (out / ".lock").write_text(pid)
    code = run_main(MODS["dit_ddpm"], ["--resume", str(out / "ckpt.pt"), "--max-steps", "3"])
    if pid == "-5":  # not a PID: refused in one line, as an unreadable lock is
        assert code == 2
        one_line_error(capsys, "is in use by a running run")
    else:
        assert code == 0 and load(out / "ckpt.pt")["step"] == 3 and not (out / ".lock").exists()


def test_the_printed_resume_command_works_for_a_folder_named_like_a_flag(fake_mnist, tmp_path):  # 14
    argv = [f if f != "X" else "--out-dir=-dash2" for f in tiny("dit_ddpm", fake_mnist, "X", "--epochs", "3",
                                                                "--max-steps", "40") if f != "--out-dir"]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "dit_ddpm.py"), *argv],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("epoch 1/3 step 3/40"):
            break
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    cmd = rest.strip().splitlines()[-1].strip()
    assert cmd == "python dit_ddpm.py --resume=-dash2/ckpt.pt"
    r = subprocess.run([sys.executable, os.path.join(HERE, "dit_ddpm.py"), *cmd.split()[2:]], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert load(tmp_path / "-dash2" / "ckpt.pt")["step"] == 40


def test_torchrun_a_stop_saves_within_10_steps_whatever_log_every(fake_mnist, tmp_path):  # 15
    """SIGTERM to one rank: every rank stops at the same step within 10 (a 4000-step --log-every would let torchrun's
    30 s grace run out), rank 0 saves and prints the resume line, and no lock stays. torchrun then reports the
    signalled rank as failed, its own way."""
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    argv = tiny("dit_ddpm", fake_mnist, out, "--max-steps", "100000", "--log-every", "4000")
    p = subprocess.Popen([*torchrun, "dit_ddpm.py", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in p.stdout:
        if line.startswith("training "):
            break
    while not (out / "ckpt.pt").exists():  # the first epoch's checkpoint: both ranks are in the loop
        assert p.poll() is None
    ranks = [int(c) for c in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]
    os.kill(ranks[-1], signal.SIGTERM)
    rest, err = p.communicate(timeout=120)
    assert "resume with:" in rest and "torchrun --nproc_per_node=2 dit_ddpm.py --resume=" in rest, err[-2000:]
    step = load(out / "ckpt.pt")["step"]
    assert 0 < step < 100000 and step % 10 == 0 and not (out / ".lock").exists()


@pytest.mark.parametrize("name, flags, words", [
    ("dit_ddpm", ["--hidden-size", "1048576", "--num-heads", "4"], "does not fit in the memory of cpu"),
    ("ddpm_unet", ["--base-channels", "65536"], "does not fit in the memory of cpu"),
    ("dit_ddpm", ["--timesteps", "2e9"], "--timesteps: invalid int value"),
    ("dit_ddpm", ["--timesteps", "2000000000"], "--timesteps: must be >= 1 and < 100001"),
    ("dit_flow", ["--sample-steps", "2000000000"], "--sample-steps: must be >= 1 and < 100001"),
])
def test_sizes_that_cannot_fit_are_refused_before_training(name, flags, words, fake_mnist, tmp_path, capsys):  # 18
    assert run_main(MODS[name], tiny(name, fake_mnist, tmp_path / "o", *flags)) == 2
    one_line_error(capsys, words)
    assert not (tmp_path / "o").exists()
