"""Unit tests for curve.py: the csv it reads back and the plot, one coloured line a script."""
import csv

import numpy as np
from PIL import Image

import curve


def test_plot_only_draws_every_script_from_the_csv(tmp_path, capsys):
    rows = []
    for i, script in enumerate(curve.SCRIPTS):  # three lines apart in both panels
        for m in (2, 5, 10):
            rows.append(dict(script=script, minutes_asked=m, steps=100 * m, train_seconds=60 * m,
                             class_accuracy=0.85 + 0.01 * m - 0.05 * i, fid=40 / m + 20 * i, precision=0.8, recall=0.7))
    with open(tmp_path / "curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, curve.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    assert curve.main(["--plot-only", "--out-dir", str(tmp_path)]) is None
    assert "from 9 runs" in capsys.readouterr().out
    img = np.asarray(Image.open(tmp_path / "curve.png").convert("RGB"))
    assert img.shape == (380, 900, 3)
    for script, colour in curve.COLOURS.items():
        left = (img[:, :450] == colour).all(-1).sum()  # the FID panel
        right = (img[:, 450:] == colour).all(-1).sum()  # the accuracy panel
        assert left > 100 and right > 100, script
