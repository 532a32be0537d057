"""Each script's model and objective as a reader copies them into another project: the model and objective sections
and the two embedding functions of common.py, run in a namespace of their own, at their class defaults (a small
width), trained by a loop of a few lines on data of another size and class count, draw class-correct samples."""
import re

import pytest
import torch

SECTION = re.compile(r"^# -{20,} (.+)$", re.M)


def sections(path):
    """{title: source} of a file's '# ---- title' sections."""
    text = open(path).read()
    marks = list(SECTION.finditer(text))
    return {m[1]: text[m.end():n.start() if n else len(text)] for m, n in zip(marks, marks[1:] + [None])}


def copied(script, *titles):
    """The sections `titles` of script.py and common.py's embeddings, executed with only torch imported."""
    source = "\n".join(["import math", "import torch", "import torch.nn as nn", "import torch.nn.functional as F",
                        sections("common.py")["embeddings"], *(sections(f"{script}.py")[t] for t in titles)])
    namespace = {}
    exec(compile(source, f"<copy of {script}.py>", "exec"), namespace)
    return namespace


def shapes(n, seed=0):
    """n 16x16 images of 4 classes (a square, a horizontal bar, a vertical bar, a frame) in [-1, 1], noise σ 0.1."""
    templates = -torch.ones(4, 1, 16, 16)
    templates[0, :, 4:12, 4:12] = 1
    templates[1, :, 6:10, 2:14] = 1
    templates[2, :, 2:14, 6:10] = 1
    templates[3, :, 2:14, 2:14] = 1
    templates[3, :, 4:12, 4:12] = -1
    y = torch.arange(n) % 4
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (templates[y] + 0.1 * noise).clamp(-1, 1), y, templates


def nearest_template_accuracy(x, y, templates):
    """Share of samples whose nearest template (RMS) is the class they were drawn for."""
    rms = (x[:, None] - templates[None]).pow(2).mean((2, 3, 4))  # (N, 4)
    return (rms.argmin(1) == y).float().mean().item()


@pytest.mark.parametrize("script, make, objective", [
    ("dit_ddpm", lambda ns: ns["DiT"](16, 1, 4, hidden_size=64, depth=2, num_heads=4), "Diffusion"),
    ("dit_flow", lambda ns: ns["DiT"](16, 1, 4, hidden_size=64, depth=2, num_heads=4), "Flow"),
    ("ddpm_unet", lambda ns: ns["UNet"](16, 1, 4, base_channels=16), "Diffusion"),
])
def test_the_copied_model_and_objective_learn_another_dataset(script, make, objective):
    ns = copied(script, "model", "flow matching" if objective == "Flow" else "diffusion")
    torch.manual_seed(0)
    x, y, templates = shapes(256)
    model, obj = make(ns), ns[objective]()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(300):
        i = torch.randint(0, len(x), (32,))
        loss = obj.loss(model, x[i], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    want = torch.arange(40) % 4
    samples, _ = obj.sample(model.eval(), (40, 1, 16, 16), want, 1.5, gen=torch.Generator().manual_seed(1))
    assert samples.shape == (40, 1, 16, 16)
    assert nearest_template_accuracy(samples, want, templates) >= 0.9  # noise or one class: about 0.25
    assert nearest_template_accuracy(torch.rand(40, 1, 16, 16) * 2 - 1, want, templates) < 0.5  # the check can fail
    # clean shapes: the data is 0.07 from its template (RMS); measured 0.035 (DiTs) and 0.065 (UNet) here, and 0.15
    # to 0.95 with the classes' former defaults (no stem or output conv, linear β, ε or v, uniform t)
    assert (samples - templates[want]).pow(2).mean((1, 2, 3)).sqrt().mean() < 0.1
