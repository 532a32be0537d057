"""Tests for evaluate.py: the metrics against known answers, then the CLI on the tiny fake MNIST of conftest.py."""
import glob
import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import harness
import evaluate

FAST = ["--classifier-epochs", "2", "--device", "cpu"]


def run(argv, capsys):
    """evaluate.main in-process -> (exit code, everything printed)."""
    code = harness.cli(evaluate.main, argv)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# ----------------------------------------------------------------------------- Fréchet distance
def test_frechet_distance_diagonal():
    # commuting covariances: Tr((Σ1 Σ2)^½) = Σ √(a_i b_i) = √(1·4) + √(4·9) = 8; ||μ1 - μ2||² = 1 + 4
    mu1, s1 = torch.zeros(2), torch.diag(torch.tensor([1.0, 4.0]))
    mu2, s2 = torch.tensor([1.0, 2.0]), torch.diag(torch.tensor([4.0, 9.0]))
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + (1 + 4) + (4 + 9) - 2 * 8, abs=1e-12)
    assert evaluate.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("s1, s2", [
    ([[2.0, 1.0], [1.0, 2.0]], [[1.0, 0.0], [0.0, 3.0]]),
    ([[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.5], [0.5, 1.0]]),  # Σ1 singular, as when a feature is always 0
])
def test_frechet_distance_non_commuting_2x2(s1, s2):
    # a 2x2 matrix M with eigenvalues >= 0 has √M = (M + √det(M) I) / √(tr M + 2 √det M), so
    # Tr(√M) = √(tr M + 2 √det M): a closed form independent of any eigendecomposition
    s1 = torch.tensor(s1, dtype=torch.float64)
    s2 = torch.tensor(s2, dtype=torch.float64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)

    def det(s):  # 2x2, exact for these entries
        return (s[0, 0] * s[1, 1] - s[0, 1] * s[1, 0]).item()
    tr_sqrt = math.sqrt((s1 @ s2).trace() + 2 * math.sqrt(det(s1) * det(s2)))  # det(Σ1 Σ2) = det Σ1 det Σ2
    mu1 = torch.tensor([0.5, -1.0])
    mu2 = torch.tensor([2.0, 1.0])
    want = (1.5 ** 2 + 2 ** 2) + s1.trace() + s2.trace() - 2 * tr_sqrt
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want.item(), abs=1e-9)


def test_frechet_distance_matches_denman_beavers():
    # 6-d random covariances; reference √(Σ1 Σ2) by the Denman-Beavers iteration (inverses, no eigenvalues)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1 = a @ a.T + 0.1 * torch.eye(6)
    s2 = b @ b.T + 0.1 * torch.eye(6)
    y, z = s1 @ s2, torch.eye(6, dtype=torch.float64)  # Y_0 = A, Z_0 = I
    for _ in range(50):  # Y -> √A, Z -> A^-½; both from the previous pair
        y, z = (y + torch.linalg.inv(z)) / 2, (z + torch.linalg.inv(y)) / 2
    assert torch.allclose(y @ y, s1 @ s2, atol=1e-8)
    mu1 = torch.randn(6, generator=g, dtype=torch.float64)
    mu2 = torch.zeros(6, dtype=torch.float64)
    want = (mu1 - mu2).square().sum() + (s1 + s2 - 2 * y).trace()
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want.item(), rel=1e-9)


def test_gaussian_matches_numpy():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, cov = evaluate.gaussian(f)
    assert np.allclose(mu.numpy(), f.numpy().mean(0))
    assert np.allclose(cov.numpy(), np.cov(f.numpy(), rowvar=False))


def test_fingerprint_is_the_datas_content():
    # the classifier cache's key: equal data hashes equal wherever it came from; other bytes, shape or dtype do not
    x = torch.arange(24, dtype=torch.uint8).view(2, 1, 3, 4)
    y = torch.tensor([0, 1])
    same = evaluate.fingerprint(x, y)
    assert evaluate.fingerprint(x.clone(), y.clone()) == same
    assert evaluate.fingerprint(x.transpose(2, 3).transpose(2, 3), y) == same  # a view of the same images
    assert evaluate.fingerprint(x.flip(0), y) != same
    assert evaluate.fingerprint(x, y.flip(0)) != same
    assert evaluate.fingerprint(x.view(2, 1, 4, 3), y) != same  # the same bytes in another shape
    assert evaluate.fingerprint(x.long(), y) != same


# ----------------------------------------------------------------------------- precision / recall
def test_knn_radii_and_manifold_on_a_line():
    ref = torch.arange(10, dtype=torch.float64)[:, None]  # points 0..9; 3rd nearest other point: 3 at the ends, else 2
    radii = evaluate.knn_radii(ref)
    assert torch.equal(radii, torch.tensor([3.0] + [2.0] * 8 + [3.0], dtype=torch.float64))
    query = torch.tensor([[-3.0], [-3.5], [5.0], [12.5]], dtype=torch.float64)  # ball edges count as inside
    assert evaluate.in_manifold(query, ref, radii) == 0.5
    assert evaluate.in_manifold(ref, ref, radii) == 1.0


# ----------------------------------------------------------------------------- CLI on fake MNIST
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One classifier cache for this module's CLI runs: the tiny classifier is trained once."""
    return str(tmp_path_factory.mktemp("evaluate_cache"))


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_real_test_images_score_perfect_and_noise_does_not(fake_mnist, cache, tmp_path, capsys):
    x, y = harness.load_dataset("mnist", fake_mnist, evaluate.DATA_SHAPES["mnist"], train=False)
    images = x.numpy().astype(np.float32) / 255
    real = write_npz(tmp_path / "real.npz", x=images, y=y.numpy(), cfg_scale=3.0)
    code, out = run([real, "--data-dir", fake_mnist, "--cache-dir", cache] + FAST, capsys)
    assert code == 0, out
    r = json.load(open(tmp_path / "real.eval.json"))
    assert abs(r["fid"]) < 1e-6
    assert r["precision"] == 1.0 and r["recall"] == 1.0
    assert r["class_accuracy"] == r["classifier_test_accuracy"]  # the same images the classifier was tested on
    assert r["fid_floor"] > 0.1 and r["n_floor"] == 64
    assert r["meta"] == {"cfg_scale": 3.0}
    assert "FID floor" in out and "precision" in out and "cfg_scale 3.0" in out

    noise = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)  # unconditional: no y
    noisy = write_npz(tmp_path / "noise.npz", x=noise)
    code, out = run([noisy, "--data-dir", fake_mnist, "--cache-dir", cache] + FAST, capsys)
    assert code == 0, out
    r = json.load(open(tmp_path / "noise.eval.json"))
    assert r["fid"] > 10 * r["fid_floor"] and r["precision"] < 0.1
    assert r["class_accuracy"] is None
    assert "n/a" in out


def test_classifier_is_cached_and_deterministic(fake_mnist, tmp_path, capsys, monkeypatch):
    x = np.random.default_rng(1).random((8, 1, 28, 28), dtype=np.float32)
    samples = write_npz(tmp_path / "s.npz", x=x)
    argv = [samples, "--data-dir", fake_mnist, "--max-train", "64"] + FAST  # 64 training images: 2 steps an epoch
    code, out = run(argv + ["--cache-dir", str(tmp_path / "c1")], capsys)
    assert code == 0 and "training the classifier" in out and "test accuracy" in out, out
    assert "classifier 64/128 img/s " in out and "classifier 128/128 img/s " in out  # progress: images seen / total
    (path,) = glob.glob(str(tmp_path / "c1" / "classifier-mnist-*.pt"))
    mtime = os.path.getmtime(path)
    first = json.load(open(tmp_path / "s.eval.json"))

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache holds this classifier")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "train_classifier", no_training)
        code, out = run(argv + ["--cache-dir", str(tmp_path / "c1")], capsys)
    assert code == 0 and "cached" in out and "training" not in out, out
    assert os.path.getmtime(path) == mtime
    assert json.load(open(tmp_path / "s.eval.json")) == first

    # same settings elsewhere: bit-identical weights; other settings: another file
    assert run(argv + ["--cache-dir", str(tmp_path / "c2")], capsys)[0] == 0
    (path2,) = glob.glob(str(tmp_path / "c2" / "classifier-mnist-*.pt"))
    assert os.path.basename(path2) == os.path.basename(path)
    w1 = torch.load(path, weights_only=True)["model"]
    w2 = torch.load(path2, weights_only=True)["model"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert run(argv + ["--cache-dir", str(tmp_path / "c1"), "--max-train", "32"], capsys)[0] == 0
    assert len(glob.glob(str(tmp_path / "c1" / "classifier-mnist-*.pt"))) == 2

    class Exploit:  # a planted cache file whose unpickling would run a command
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)
    torch.save({"script": "evaluate", "model": Exploit()}, path)
    code, out = run(argv + ["--cache-dir", str(tmp_path / "c1")], capsys)
    assert code == 0 and "ignoring the cached classifier" in out and "holds objects" in out, out
    assert not (tmp_path / "pwned").exists()


def good_x(n=8):
    return np.full((n, 1, 28, 28), 0.5, dtype=np.float32)


def npy_bytes(a):
    """A lone array in .npy format (what np.save writes), not an .npz archive."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "does not exist"),
    (lambda p: p.write_text("not numpy"), "not an .npz"),
    (lambda p: p.write_bytes(npy_bytes(good_x())), "not an .npz"),
    (lambda p: np.savez(p, images=good_x()), "no 'x' array"),
    (lambda p: np.savez(p, x=good_x()[:, 0]), "needs floats (N, 1, 28, 28)"),
    (lambda p: np.savez(p, x=np.zeros((8, 3, 28, 28), np.float32)), "needs floats (N, 1, 28, 28)"),
    (lambda p: np.savez(p, x=good_x().astype(np.complex64)), "needs floats (N, 1, 28, 28)"),
    (lambda p: (np.savez(p, x=good_x()), os.mkdir(p.parent / "bad.eval.json")), "cannot write"),
    (lambda p: np.savez(p, x=good_x() * 255), "must lie in [0, 1]"),
    (lambda p: np.savez(p, x=np.where(np.arange(28) == 3, np.nan, good_x())), "NaN"),
    (lambda p: np.savez(p, x=good_x(3)), "need at least 4"),
    (lambda p: np.savez(p, x=good_x(), y=np.arange(7)), "8 integer labels"),
    (lambda p: np.savez(p, x=good_x(), y=np.arange(8) + 3), "labels in 0..9"),
])
def test_bad_input_exit_2(make, words, fake_mnist, tmp_path, capsys):
    p = tmp_path / "bad.npz"
    make(p)
    cache = tmp_path / "cache"
    code, out = run([str(p), "--data-dir", fake_mnist, "--cache-dir", str(cache)] + FAST, capsys)
    assert code == 2 and words in out, out
    assert not (tmp_path / "bad.eval.json").is_file()  # nothing computed
    assert not cache.exists()  # nothing written


def test_bad_dataset_exit_2(tmp_path, capsys):
    code, out = run([write_npz(tmp_path / "s.npz", x=good_x()), "--dataset", "cifar10"], capsys)
    assert code == 2 and "unknown --dataset" in out


def test_cli_one_line_on_stderr(tmp_path):
    here = os.path.dirname(os.path.abspath(evaluate.__file__))
    r = subprocess.run([sys.executable, "evaluate.py", str(tmp_path / "missing.npz")], capture_output=True, text=True,
                       cwd=here)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: samples file") and r.stderr.count("\n") == 1
