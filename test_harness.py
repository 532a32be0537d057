"""Unit tests for harness.py: flag types, device, flag defaults, checkpoints, signals."""
import argparse
import inspect
import os
import re
import signal

import pytest
import torch

import ddpm_unet
import dit_ddpm
import dit_flow
import harness


def test_device_errors():
    assert harness.pick_device("cpu") == (0, 1, torch.device("cpu"))
    cuda_past_end = f"cuda:{torch.cuda.device_count()}"
    mps = "mps" * (not torch.backends.mps.is_available())  # "" (no name) where MPS exists
    for bad in ("gpu", "cpu:1", cuda_past_end, mps):
        with pytest.raises(harness.UsageError, match="no such device"):
            harness.pick_device(bad)


def test_ranged_types():
    p = harness.Parser()
    p.add_argument("--n", type=harness.size)
    p.add_argument("--p", type=harness.fraction)
    p.add_argument("--lr", type=harness.positive)
    assert vars(p.parse_args(["--n", "1", "--p", "0", "--lr", "1e-9"])) == {"n": 1, "p": 0.0, "lr": 1e-9}
    bad = [
        (["--n", "0"], "--n: must be >= 1 (got 0)"),
        (["--p", "1"], "--p: must be >= 0 and < 1"),
        (["--lr", "0"], "--lr: must be > 0"),
        (["--lr", "nan"], "--lr"),
        (["--n", "x"], "--n"),
    ]
    for argv, words in bad:
        with pytest.raises(harness.UsageError, match=re.escape(words)):
            p.parse_args(argv)


def test_parse_args_quick_and_named_flags():
    a, ckpt = harness.parse_args(dit_ddpm.get_parser, ["--quick", "--depth", "2"], dit_ddpm.QUICK, "dit_ddpm")
    assert ckpt is None
    assert a.depth == 2  # the flag beats --quick
    assert a.hidden_size == 96 and a.sampler == "dpm++"  # --quick's
    assert dit_ddpm.get_parser().parse_args([]).hidden_size == 384  # without --quick the defaults stay
    assert "--quick" in dit_ddpm.get_parser().format_help()


def test_checkpoints_never_hold_nan_and_load_without_code(tmp_path):
    ck = {"script": "s", "model": {"w": torch.ones(2)}, "ema": {"w": torch.ones(2)}, "step": 3, "args": {"lr": 1.0},
          "rng": [torch.get_rng_state()], "opt": {}, "loss_log": [(3, 0.5)], "loss_acc": (0.0, 0)}
    harness.save_checkpoint(ck, tmp_path / "ok.pt")
    assert harness.load_checkpoint(tmp_path / "ok.pt", "s")["step"] == 3
    with pytest.raises(harness.UsageError, match="NaN/inf at step 3.*keeps the last good state") as e:
        harness.save_checkpoint({**ck, "ema": {"w": torch.tensor([1.0, float("inf")])}}, tmp_path / "ok.pt")
    assert e.value.code == 1
    assert os.listdir(tmp_path) == ["ok.pt"]
    torch.save({**ck, "args": argparse.Namespace(lr=1.0)}, tmp_path / "obj.pt")  # any class, even a harmless one
    with pytest.raises(harness.UsageError, match="holds objects other than tensors"):
        harness.load_checkpoint(tmp_path / "obj.pt", "s")


def test_stop_signals_set_a_flag_then_restore():
    before = signal.getsignal(signal.SIGTERM)
    with harness.stop_signals() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop
    assert signal.getsignal(signal.SIGTERM) is before


def same_object(a, b):
    """Equal attributes, tensors included (the objectives), or equal module structure and shapes (the models)."""
    if isinstance(a, torch.nn.Module):
        return repr(a) == repr(b) and {k: v.shape for k, v in a.state_dict().items()} == {
            k: v.shape for k, v in b.state_dict().items()}
    va, vb = vars(a), vars(b)
    return va.keys() == vb.keys() and all(torch.equal(va[k], vb[k]) if torch.is_tensor(va[k]) else
                                          tuple(va[k]) == tuple(vb[k]) if isinstance(va[k], (list, tuple)) else
                                          va[k] == vb[k] for k in va)


@pytest.mark.parametrize("mod,model,objective,flags", [
    (dit_ddpm, "DiT", "Diffusion", []),
    (dit_flow, "DiT", "Flow", ["--dataset", "mnist"]),
    (ddpm_unet, "UNet", "Diffusion", []),
    (ddpm_unet, "UNet", "Diffusion", ["--cond"]),
])
def test_the_classes_defaults_are_what_the_script_trains(mod, model, objective, flags):
    """A model built with only the data's shape (and its class count where the script is conditional) and an
    objective built with no argument equal what the script builds from its default flags; the sampling flags default
    to sample()'s defaults."""
    a = harness.parse_args(mod.get_parser, flags, mod.QUICK, mod.SCRIPT)[0]
    C, S, K = mod.DATA[a.dataset]
    torch.manual_seed(0)
    built, _, _, obj = mod.build(a, torch.device("cpu"))
    K = K if getattr(a, "cond", True) else 0
    assert same_object(built, getattr(mod, model)(S, C, K) if K else getattr(mod, model)(S, C))
    assert same_object(obj, getattr(mod, objective)())
    sample = inspect.signature(getattr(mod, objective).sample).parameters
    assert (a.sampler, a.sample_steps) == (sample["sampler"].default, sample["steps"].default)
    assert a.eta == sample["eta"].default if "eta" in sample else not hasattr(a, "eta")


def test_defaults_reads_keyword_defaults():
    def f(x, y=2, *, z="a"):
        pass

    class C:
        def __init__(self, n, w=3.0):
            pass
    assert harness.defaults(f, C) == {"y": 2, "z": "a", "w": 3.0}
