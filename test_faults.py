"""The faults the README promises to catch, each over the scripts it applies to: data the loader checks, edited
checkpoints, flags that combine badly, a run folder that one run holds, guarded writes, stops by signal. The data is
written here."""
import itertools
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

import common
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
    assert common.cli(evaluate.main, evaluate_argv(tmp_path, mnist_with(tmp_path / "d", kind))) == 2
    one_line_error(capsys, DATA_FAULTS[kind])
    assert not (tmp_path / "cache").exists() and not (tmp_path / "s.eval.json").exists()


def test_evaluate_seed_is_the_scripts_seed(fake_mnist, tmp_path, capsys):  # 13
    assert common.cli(evaluate.main, evaluate_argv(tmp_path, fake_mnist, "--seed", "1" + "0" * 23)) == 2
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
    assert common.cli(evaluate.main, evaluate_argv(tmp_path, fake_mnist)) == 1
    one_line_error(capsys, f"could not write {tmp_path / 's.eval.json'}")
    assert no_temp_files(tmp_path)


# ----------------------------------------------------------------------------- signals (15 and the exit codes)
@SCRIPTS
@pytest.mark.parametrize("sig, during", [(signal.SIGINT, "save_checkpoint"), (signal.SIGTERM, "save_samples")])
def test_a_signal_during_the_last_save_stops_the_run(name, sig, during, fake_mnist, tmp_path, capsys, monkeypatch):
    """After the last loss.csv row: what is saved stays, one line, 130 / 143, no final sampling; resuming samples."""
    mod, out = MODS[name], tmp_path / "run"
    real = getattr(mod, during)

    def signalled(*args, **kw):
        signal.raise_signal(sig)  # the training loop's handler notes it
        return real(*args, **kw)
    monkeypatch.setattr(mod, during, signalled)
    assert run_main(mod, tiny(name, fake_mnist, out, "--max-steps", "2", "--num-samples", "3")) == 128 + sig
    printed = capsys.readouterr()
    assert printed.err == f"error: {common.STOPS[sig]}\n" and "resume with" in printed.out
    assert load(out / "ckpt.pt")["step"] == 2 and (out / "grid_e001_cfg1.png").exists()
    assert not (out / "samples.npz").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    assert run_main(mod, ["--resume", str(out / "ckpt.pt")]) == 0 and len(np.load(out / "samples.npz")["x"]) == 3


@SCRIPTS
def test_sigterm_while_sampling_only_is_one_line_and_143(name, trained, tmp_path, capsys, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)

    def terminated(*args, **kw):
        assert signal.getsignal(signal.SIGTERM) is common.interrupt  # else SIGTERM would end pytest itself
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(MODS[name], "write_npz", terminated)
    out = tmp_path / "o"
    assert run_main(MODS[name], ["--sample-only", "--ckpt", trained[name], "--out-dir", str(out),
                                 "--num-samples", "5"]) == 143
    assert capsys.readouterr().err == "error: terminated\n"
    assert signal.getsignal(signal.SIGTERM) is before and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- the LR schedule
def test_a_warmup_longer_than_the_run_is_cut_to_half_of_it():
    lrs = [common.lr_at(s, 1.0, 200, 100) for s in range(100)]
    assert lrs[0] == 1 / 50 and lrs[49] == 1.0 and max(lrs) == 1.0  # warm-up over 50 steps
    assert lrs[-1] < 1e-3 and all(a > b for a, b in itertools.pairwise(lrs[50:]))  # then the cosine to 0
    assert [common.lr_at(s, 1.0, 4, 104) for s in (0, 3)] == [0.25, 1.0]  # a warm-up within half the run stays
