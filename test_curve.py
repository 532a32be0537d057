"""Unit tests for curve.py: the csv it reads back, the plot (one coloured line a script, numeric ticks on both axes),
the tick values and the timing step. Its faults (bad input, reruns, signals) are in test_faults.py."""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

import curve


def write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, curve.FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def three_lines():
    rows = []
    for i, script in enumerate(curve.SCRIPTS):  # three lines apart in both panels
        for m in (1, 2, 5, 10):
            rows.append(dict(script=script, minutes_asked=m, steps=100 * m, train_seconds=60 * m + 7,
                             class_accuracy=min(1.0, 0.9 + 0.01 * m - 0.02 * i), fid=40 / m + 20 * i, precision=0.8,
                             recall=0.7))
    return rows


def test_plot_only_draws_every_script_from_the_csv(tmp_path, capsys):
    write_rows(tmp_path / "curve.csv", three_lines())
    assert curve.main(["--plot-only", "--out-dir", str(tmp_path)]) is None
    assert "from 12 runs" in capsys.readouterr().out
    img = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB"))
    h, w, _ = img.shape
    assert (h, w) == (420, 960)
    for script, colour in curve.COLOURS.items():
        left = (img[:, :w // 2] == colour).all(-1).sum()  # the FID panel
        right = (img[:, w // 2:] == colour).all(-1).sum()  # the accuracy panel
        assert left > 100 and right > 100, script
        legend = (img[20:50] == colour).all(-1).sum()  # the legend above each panel: a short line a script
        assert legend > 20, script
    dark = (img < 100).all(-1)  # text: the ticks' numbers left of and below each box, the rotated axis names
    for x0 in (0, w // 2):
        assert dark[60:360, x0:x0 + 20].sum() > 30  # the y-axis name
        assert dark[60:360, x0 + 30:x0 + 64].sum() > 50  # the y ticks' numbers
        assert dark[370:390, x0 + 60:x0 + w // 2].sum() > 50  # the x ticks' numbers
        assert dark[395:415, x0 + 60:x0 + w // 2].sum() > 50  # the x-axis name


def test_plot_ticks_are_numbers_spanning_the_data_and_accuracy_ends_at_100(tmp_path):
    rows = [{k: (v if k == "script" else float(v)) for k, v in r.items()} for r in three_lines()]
    drawn = curve.plot(rows, str(tmp_path / "c.png"))
    assert drawn["minutes"][0] == 0 and drawn["minutes"][-1] >= 10  # the largest budget
    assert drawn["fid"][0] == 0 and drawn["fid"][-1] >= 80
    acc = drawn["class_accuracy"]
    assert acc[-1] == 100 and acc[0] <= 100 * min(r["class_accuracy"] for r in rows)
    for t in drawn.values():
        assert len(t) >= 3 and t == sorted(t) and len({round(b - a, 9) for a, b in zip(t, t[1:])}) == 1  # even steps
    one = [dict(rows[0], class_accuracy=1.0)]  # one point at 100%: the axis still ends at 100, below it a span
    drawn = curve.plot(one, str(tmp_path / "one.png"))
    assert drawn["class_accuracy"][-1] == 100 and drawn["class_accuracy"][0] < 100


@pytest.mark.parametrize("lo, hi, want", [
    (0, 10, [0, 2, 4, 6, 8, 10]),
    (0, 11.1, [0, 2.5, 5, 7.5, 10, 12.5]),
    (87, 99.3, [85, 87.5, 90, 92.5, 95, 97.5, 100]),
    (0, 0.3, [0, 0.1, 0.2, 0.3]),
    (5, 5, [5, 5.1, 5.2, 5.3, 5.4, 5.5]),  # one value: a span above it
])
def test_ticks(lo, hi, want):
    assert curve.ticks(lo, hi) == pytest.approx(want)


def test_one_step_is_an_optimiser_step_on_the_objectives_loss():
    class Obj:
        def loss(self, model, x, y):
            return ((model(x) - y) ** 2).mean()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    before = Obj().loss(model, x, y).item()
    curve.one_step(model, opt, Obj(), x, y)
    assert Obj().loss(model, x, y).item() < before


def test_new_points_train_for_the_budget_then_are_scored_and_appended(tmp_path, monkeypatch, capsys):
    """The flow of a run, its processes stood in for: steps from the timed rate, the row from what they wrote."""
    ran = []

    def run(self, cmd):  # what the script and evaluate.py would write and print
        ran.append(cmd)
        self.printed = ""
        out = cmd[cmd.index("--out-dir") + 1] if "--out-dir" in cmd else None
        if cmd[1].endswith("evaluate.py"):  # evaluate.py SAMPLES.npz: SAMPLES.eval.json beside it
            with open(cmd[2].replace(".npz", ".eval.json"), "w") as f:
                f.write('{"class_accuracy": 0.9, "fid": 20.0, "precision": 0.8, "recall": 0.7}')
        else:
            os.makedirs(out)
            for f in ("ckpt.pt", "samples.npz"):
                open(os.path.join(out, f), "w").close()
            self.printed = f"training ...\ntrained {cmd[cmd.index('--max-steps') + 1]} steps in 66.6 s (with ...)\n"
    monkeypatch.setattr(curve.Stops, "run", run)
    monkeypatch.setattr(curve, "check_data", lambda scripts, data_dir: None)
    monkeypatch.setattr(curve, "images_per_second", lambda script: (40.0, 32))
    out = tmp_path / "c"
    assert curve.main(["--minutes", "0.5", "2", "--scripts", "ddpm_unet", "--out-dir", str(out)]) is None
    trains = [c for c in ran if c[1].endswith("ddpm_unet.py")]
    assert [c[c.index("--max-steps") + 1] for c in trains] == ["38", "150"]  # minutes x 60 x img/s / batch
    assert all("--quick" in c and c[c.index("--num-samples") + 1] == "1000" for c in trains)
    assert (out / "ddpm_unet_2min" / "curve.log").read_text().startswith("training")
    rows = list(csv.DictReader(open(out / "curve.csv")))
    assert [(r["minutes_asked"], r["steps"], r["train_seconds"], r["fid"]) for r in rows] == [
        ("0.5", "38", "66.6", "20.0"), ("2.0", "150", "66.6", "20.0")]
    assert (out / "curve.png").exists() and "from 2 runs" in capsys.readouterr().out
