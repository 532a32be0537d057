"""Score a samples.npz from any script in this repo against the real data: FID, class accuracy, precision
and recall, all in the feature space of a small CNN classifier that this script trains on first use.

    python evaluate.py runs/dit_ddpm/samples.npz                       # MNIST in ./data
    python evaluate.py samples.npz --data-dir ../shared/data --cache-dir runs/evaluate_cache
    python evaluate.py samples.npz --dataset fashion-mnist

The first run per dataset trains the classifier on the training split, prints its test accuracy and caches
it as <cache-dir>/classifier-<dataset>-<hash>.pt (default cache-dir: <data-dir>/evaluate_cache; the hash
covers every setting that changes the weights and the content of the data: the training images and labels it
learns from and the test split its reported accuracy is of, so other data of the same size, wherever it lies,
trains its own classifier); later runs with the same data load it. Prints one table and writes
SAMPLES.eval.json beside SAMPLES.npz:
  FID          Fréchet distance between Gaussians fitted to the penultimate features of the samples and
               of the test split; lower is better
  FID floor    the same FID for as many real training images (mean ± sd over 5 random draws): what a
               perfect generator scores at this N
  class acc    classifier prediction == requested label y (n/a when the npz has no y)
  precision    share of samples inside the real images' k-NN balls (k = 3, Kynkäänniemi et al. 2019)
  recall       share of real images inside the samples' k-NN balls; both against a test subset of the same N
"""
import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import atomic_write
from harness import (
    Parser,
    UsageError,
    cli,
    count,
    load_checkpoint,
    load_dataset,
    pick_device,
    progress,
    save_checkpoint,
    seed,
    size,
)

SCRIPT = "evaluate"
ARCH = 1  # bump when Classifier or its training changes: cached weights under the old hash stop matching
DATA_SHAPES = {"mnist": (1, 28, 10), "fashion-mnist": (1, 28, 10)}  # channels, size, classes
K = 3  # nearest neighbours for precision and recall
FLOOR_DRAWS = 5  # random draws of training images behind the real-vs-real floor (mean ± sd)


# ----------------------------------------------------------------------------- config
def get_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("samples", help="samples.npz: x float in [0, 1], (N, C, H, W); optional integer labels y")
    p.add_argument("--dataset", default="mnist", help="mnist | fashion-mnist")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--cache-dir", default="", help="classifier cache (default: <data-dir>/evaluate_cache)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps")
    p.add_argument("--seed", type=seed, default=0, help="the classifier's training and the metrics' draws")
    p.add_argument("--classifier-epochs", type=size, default=5)
    p.add_argument("--max-train", type=count, default=0, help="train the classifier on the first N images (0: all)")
    a = p.parse_args(argv)
    if a.dataset not in DATA_SHAPES:
        raise UsageError(f"unknown --dataset '{a.dataset}' (choose from {', '.join(DATA_SHAPES)})")
    a.cache_dir = a.cache_dir or os.path.join(a.data_dir, "evaluate_cache")
    return a


def load_samples(path, dataset):
    """samples.npz -> x (N, C, H, W) float32 in [0, 1], y (N,) int64 or None, scalar metadata; every check here."""
    if not os.path.isfile(path):
        raise UsageError(f"samples file {path} does not exist")
    try:
        z = np.load(path, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}  # a lone .npy array has no .files: AttributeError
    except Exception as e:  # noqa: BLE001 (whatever numpy raises: the file is refused in one line)
        raise UsageError(f"{path} is not an .npz archive ({type(e).__name__}); expected one written by np.savez")
    if "x" not in arrays:
        raise UsageError(f"{path} has no 'x' array (keys: {', '.join(arrays) or 'none'})")
    x, y = arrays["x"], arrays.get("y")
    c, s, classes = DATA_SHAPES[dataset]
    if x.ndim != 4 or x.shape[1:] != (c, s, s) or x.dtype.kind not in "fiu":  # real numbers only
        raise UsageError(f"x in {path} has shape {x.shape}, dtype {x.dtype}; {dataset} needs floats (N, {c}, {s}, {s})")
    if len(x) < K + 1:
        raise UsageError(f"{path} holds {len(x)} samples; need at least {K + 1} (k = {K} nearest neighbours)")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UsageError(f"x in {path} contains NaN or inf")
    if x.min() < 0 or x.max() > 1:
        raise UsageError(f"x in {path} must lie in [0, 1] (found {x.min():.3g} .. {x.max():.3g}); "
                         f"map [-1, 1] images with (x + 1) / 2")
    if y is not None and (y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer)
                          or y.min() < 0 or y.max() >= classes):
        raise UsageError(f"y in {path} must be {len(x)} integer labels in 0..{classes - 1} "
                         f"(got shape {y.shape}, dtype {y.dtype})")
    meta = {k: v.item() for k, v in arrays.items() if k not in ("x", "y") and v.ndim == 0}
    return torch.from_numpy(x), None if y is None else torch.from_numpy(y).long(), meta


# ----------------------------------------------------------------------------- model
def conv_stage(c_in, c_out):
    """3x3 conv, batch norm, ReLU, 2x2 max-pool: (N, c_in, S, S) -> (N, c_out, S/2, S/2)."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]


class Classifier(nn.Module):
    """Two conv-BN-ReLU-pool stages and an MLP head; `features` (the 128-d penultimate layer) feeds every metric."""

    def __init__(self, channels=1, size=28, classes=10, width=16, feat=128):
        super().__init__()
        self.body = nn.Sequential(*conv_stage(channels, width), *conv_stage(width, 2 * width),  # (N, 2w, S/4, S/4)
                                  nn.Flatten(), nn.Linear(2 * width * (size // 4) ** 2, feat), nn.ReLU())  # (N, feat)
        self.head = nn.Linear(feat, classes)

    def features(self, x):  # x (N, C, H, W) in [0, 1] -> (N, feat)
        return self.body(x * 2 - 1)

    def forward(self, x):
        return self.head(self.features(x))  # (N, classes) logits


def as_float(x):
    """uint8 images -> floats in [0, 1]; floats pass through."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def train_classifier(model, x, y, epochs, seed, dev, batch=64, lr=2e-3, shift=2):
    """Adam, lr decaying linearly to 0, each batch rolled by up to `shift` pixels; data is one uint8 tensor."""
    x, y = x.to(dev), y.to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // batch)
    step = 0
    tick = progress("classifier", epochs * len(x))  # a line each tenth of the images seen: done/total, img/s, eta
    model.train()
    for epoch in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).to(dev).split(batch):
            for g in opt.param_groups:
                g["lr"] = lr * (1 - step / steps)
            dy, dx = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
            xb = torch.roll(as_float(x[idx]), (dy, dx), (2, 3))  # digits sit on an empty border: roll = translation
            loss = F.cross_entropy(model(xb), y[idx])  # L = -log softmax(logits)[y]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tick(min(step * batch, epochs * len(x)))
        print(f"classifier epoch {epoch + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def embed(model, x, dev, batch=1000):
    """Images (N, C, H, W) -> penultimate features (N, F) float64 on the CPU and predicted classes (N,)."""
    feats = [model.features(as_float(b.to(dev))) for b in x.split(batch)]
    preds = [model.head(f).argmax(1).cpu() for f in feats]
    return torch.cat(feats).double().cpu(), torch.cat(preds)


def fingerprint(*tensors):
    """SHA-1 of the tensors' dtypes, shapes and bytes: the same data, wherever it lies, gives the same hex digest."""
    h = hashlib.sha1()
    for t in tensors:
        h.update(f"{t.dtype} {tuple(t.shape)};".encode())
        h.update(t.contiguous().numpy())
    return h.hexdigest()


def get_classifier(a, dev, train, test):
    """The cached classifier for these settings and this data (a hash of the training and test images and labels, so
    other data of the same size trains its own), or a freshly trained one (test accuracy reported, then cached)."""
    settings = {"dataset": a.dataset, "epochs": a.classifier_epochs, "seed": a.seed, "arch": ARCH,
                "n_train": len(train[0]), "data": fingerprint(*train, *test)}
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(a.cache_dir, f"classifier-{a.dataset}-{key}.pt")
    if os.path.isfile(path):
        try:
            ckpt = load_checkpoint(path, SCRIPT, keys=("model", "test_acc"))  # weights_only: runs no code
            model = Classifier(*DATA_SHAPES[a.dataset])
            model.load_state_dict(ckpt["model"])
            print(f"classifier: cached {path}, test accuracy {ckpt['test_acc']:.2%}")
            return model.to(dev).eval(), ckpt["test_acc"], path
        except (UsageError, RuntimeError, KeyError) as e:
            print(f"note: ignoring the cached classifier ({str(e)[:120]}); training a new one")
    try:  # checked before training, not after
        os.makedirs(a.cache_dir, exist_ok=True)
        writable = os.access(a.cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UsageError(f"cannot write the classifier cache in {a.cache_dir}; pass --cache-dir DIR (writable)")
    print(f"training the classifier on {len(train[0])} {a.dataset} images, {a.classifier_epochs} epochs, "
          f"device {dev}", flush=True)
    torch.manual_seed(a.seed)
    t0 = time.time()
    model = train_classifier(Classifier(*DATA_SHAPES[a.dataset]).to(dev), *train, a.classifier_epochs, a.seed, dev)
    acc = (embed(model, test[0], dev)[1] == test[1]).double().mean().item()
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    save_checkpoint({"script": SCRIPT, "model": state, "ema": {}, "step": 0, "args": settings, "test_acc": acc,
                     "train_s": time.time() - t0}, path)
    print(f"classifier: trained in {time.time() - t0:.0f}s, test accuracy {acc:.2%}, cached as {path}")
    return model, acc, path


# ----------------------------------------------------------------------------- metrics
def gaussian(f):
    """Features (N, F) -> mean (F,) and unbiased covariance (F, F)."""
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (len(f) - 1)  # Σ = (f - μ)ᵀ (f - μ) / (N - 1)


def frechet_distance(mu1, s1, mu2, s2):
    """Fréchet distance of two Gaussians in float64, with Tr((Σ1 Σ2)^½) from symmetric eigenproblems only."""
    mu1, s1, mu2, s2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, s1, mu2, s2))
    w, v = torch.linalg.eigh(s1)
    r1 = (v * w.clamp(min=0).sqrt()) @ v.T  # √Σ1 = V diag(√w) Vᵀ
    m = r1 @ s2 @ r1  # √Σ1 Σ2 √Σ1: symmetric PSD with the eigenvalues of Σ1 Σ2
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()  # Tr((Σ1 Σ2)^½) = Σ √λ_i
    d2 = (mu1 - mu2).square().sum()
    return (d2 + s1.trace() + s2.trace() - 2 * tr_sqrt).item()  # ||μ1 - μ2||² + Tr(Σ1 + Σ2 - 2 (Σ1 Σ2)^½)


def fid(f1, f2):
    """FID between two feature sets (N1, F) and (N2, F)."""
    return frechet_distance(*gaussian(f1), *gaussian(f2))


def knn_radii(f, k=K, chunk=1000):
    """Radius of each point's ball: distance from each row of f (N, F) to its k-th nearest other row."""
    return torch.cat([torch.cdist(c, f).kthvalue(k + 1, dim=1).values for c in f.split(chunk)])  # k+1: self at 0


def in_manifold(query, ref, radii, chunk=1000):
    """Share of query rows (Q, F) inside at least one ball around the reference rows (R, F)."""
    inside = [(torch.cdist(c, ref) <= radii).any(1) for c in query.split(chunk)]  # ∃ r: ||q - r|| <= radius(r)
    return torch.cat(inside).double().mean().item()


def evaluate(model, x, y, train, test, dev, seed):
    """Every metric for samples x (N, C, H, W) (labels y or None) against the real splits, as a dict."""
    gen = torch.Generator().manual_seed(seed)
    f_fake, pred = embed(model, x, dev)
    f_test = embed(model, test[0], dev)[0]
    n = min(len(x), len(test[0]))  # precision / recall compare equal counts
    real = f_test[torch.randperm(len(f_test), generator=gen)[:n]]  # (n, F)
    fake = f_fake[torch.randperm(len(x), generator=gen)[:n]]  # (n, F)
    n_floor = min(len(x), len(train[0]))  # the floor at this N, over a few random draws of training images
    draws = torch.stack([torch.randperm(len(train[0]), generator=gen)[:n_floor] for _ in range(FLOOR_DRAWS)])
    used = draws.unique()  # sorted: each training image is embedded once however many draws hold it
    f_used = embed(model, train[0][used], dev)[0]
    floors = torch.tensor([fid(f_used[torch.searchsorted(used, d)], f_test) for d in draws], dtype=torch.float64)
    return {"n_samples": len(x), "n_test": len(f_test), "fid": fid(f_fake, f_test), "n_floor": n_floor,
            "fid_floor": floors.mean().item(), "fid_floor_sd": floors.std().item(),
            "class_accuracy": None if y is None else (pred == y).double().mean().item(),
            "precision": in_manifold(fake, real, knn_radii(real)),  # samples on the real manifold
            "recall": in_manifold(real, fake, knn_radii(fake)), "n_pr": n, "k": K}  # real images on the samples'


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a = get_args(argv)
    x, y, meta = load_samples(a.samples, a.dataset)  # every input check before anything is computed or written
    out = os.path.splitext(a.samples)[0] + ".eval.json"
    try:  # the output must be writable too
        existed = os.path.exists(out)
        open(out, "a").close()
        existed or os.remove(out)
    except OSError as e:
        raise UsageError(f"cannot write {out} ({e.strerror}); put the samples in a writable folder")
    dev = pick_device(a.device)[2]
    train = load_dataset(a.dataset, a.data_dir, DATA_SHAPES[a.dataset], train=True)  # labels and image size checked
    test = load_dataset(a.dataset, a.data_dir, DATA_SHAPES[a.dataset], train=False)
    if a.max_train:
        train = (train[0][:a.max_train], train[1][:a.max_train])
    if min(len(train[0]), len(test[0])) < K + 1:
        raise UsageError(f"{a.dataset} in {a.data_dir} has too few images for k = {K} nearest neighbours")
    model, acc, cache = get_classifier(a, dev, train, test)
    t0 = time.time()
    r = evaluate(model, x, y, train, test, dev, a.seed)
    r.update(samples=a.samples, dataset=a.dataset, meta=meta, classifier=cache, classifier_test_accuracy=acc)
    atomic_write(out, lambda f: f.write(json.dumps(r, indent=1, default=str).encode()))  # fails in one line, exit 1
    ca = "n/a" if r["class_accuracy"] is None else f"{r['class_accuracy']:.2%}"
    info = ", ".join(f"{k} {v}" for k, v in meta.items())
    print(f"\n{a.samples}: {len(x)} samples{', ' + info if info else ''}; {a.dataset} test split: {len(test[0])}\n"
          f"{'metric':<16}{'value':>9}  note\n"
          f"{'FID':<16}{r['fid']:>9.3f}  {len(x)} samples vs {len(test[0])} test images\n"
          f"{'FID floor':<16}{r['fid_floor']:>9.3f}  ± {r['fid_floor_sd']:.3f}: {r['n_floor']} random train images vs "
          f"the same test images, {FLOOR_DRAWS} draws\n"
          f"{'class accuracy':<16}{ca:>9}  prediction == y (classifier: {acc:.2%} on test)\n"
          f"{'precision':<16}{r['precision']:>9.3f}  k = {K}, {r['n_pr']} samples vs {r['n_pr']} test images\n"
          f"{'recall':<16}{r['recall']:>9.3f}\n"
          f"wrote {out} ({time.time() - t0:.1f}s)")
    if len(x) < 1000:
        print(f"note: with {len(x)} samples FID, precision and recall are noisy (see the floor's ± sd); use >= 1000")


if __name__ == "__main__":
    raise SystemExit(cli(main))
