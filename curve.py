"""CPU minutes to sample quality: each script's --quick recipe scaled by steps to a budget in minutes, 1000 samples
from each run scored by evaluate.py. Writes curve.csv (one row a run) and curve.png (FID and class accuracy against
training minutes, one line a script). Run it on a quiet machine: the budgets are wall time.

    python curve.py --data-dir ../shared/data --minutes 2 5 10 20              # all three scripts
    python curve.py --data-dir ../shared/data --minutes 2 --scripts dit_ddpm   # one point
    python curve.py --plot-only --out-dir runs/curve                           # redraw curve.png from curve.csv

The steps for a budget come from the training rate, timed first on the script's own quick model (training steps on
random data); the minutes plotted are the ones each run measured.
"""
import argparse
import csv
import importlib
import json
import os
import re
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw

from common import cli, parse_args, pick_device

SCRIPTS = ["dit_ddpm", "dit_flow", "ddpm_unet"]
COLOURS = {"dit_ddpm": (31, 119, 180), "dit_flow": (255, 127, 14), "ddpm_unet": (44, 160, 44)}
FIELDS = ["script", "minutes_asked", "steps", "train_seconds", "class_accuracy", "fid", "precision", "recall"]


def images_per_second(script, steps=30):
    """Training rate of the script's --quick recipe on random data (the data loading is negligible)."""
    mod = importlib.import_module(script)
    a = parse_args(mod.get_parser, ["--quick", "--device", "cpu"], mod.QUICK, script)[0]
    a.amp = False
    torch.manual_seed(0)
    model, ema, opt, obj = mod.build(a, pick_device("cpu")[2])
    C, S, K = mod.DATA[a.dataset]
    x = torch.rand(a.batch_size, C, S, S) * 2 - 1
    y = torch.arange(a.batch_size) % K
    for _ in range(5):  # warm-up
        mod.train_step(a, model, opt, obj, x, y, a.lr)
    t0 = time.perf_counter()
    for _ in range(steps):
        mod.train_step(a, model, opt, obj, x, y, a.lr)
    return steps * a.batch_size / (time.perf_counter() - t0), a.batch_size


def run_point(script, minutes, rate, batch, a):
    """Train for `minutes` at `rate`, sample 1000 images, score them; -> the csv row."""
    steps = max(1, round(minutes * 60 * rate / batch))
    out = os.path.join(a.out_dir, f"{script}_{minutes:g}min")
    cmd = [sys.executable, f"{script}.py", "--quick", "--max-steps", str(steps), "--data-dir", a.data_dir,
           "--out-dir", out, "--device", "cpu", "--num-samples", "1000"]
    print(" ".join(cmd), flush=True)
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    seconds = float(re.search(r"^trained \d+ steps in ([\d.]+) s", log, re.M).group(1))
    scores = [sys.executable, "evaluate.py", f"{out}/samples.npz", "--data-dir", a.data_dir, "--cache-dir", a.cache_dir]
    subprocess.run(scores, capture_output=True, check=True)
    r = json.load(open(f"{out}/samples.eval.json"))
    return dict(script=script, minutes_asked=minutes, steps=steps, train_seconds=round(seconds, 1),
                class_accuracy=r["class_accuracy"], fid=r["fid"], precision=r["precision"], recall=r["recall"])


def plot(rows, path, w=900, h=380, m=50):
    """Two panels, FID and class accuracy against training minutes, one line a script (legend above each)."""
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    x_max = max(r["train_seconds"] for r in rows) / 60 * 1.05
    panels = [("FID (lower is better)", "fid", 0), ("class accuracy % (higher is better)", "class_accuracy", 1)]
    for title, key, i in panels:
        left = m + i * w // 2
        right = left + w // 2 - 2 * m
        values = [100 * r[key] if key == "class_accuracy" else r[key] for r in rows]
        lo = min(values) * 0.95
        hi = max(values) * 1.02
        draw.rectangle([left, m, right, h - m], outline="gray")
        draw.text((left, 10), title, fill="black")
        draw.text((left, h - m + 5), f"0 .. {x_max:.0f} min of CPU training", fill="black")
        draw.text((left - 45, m), f"{hi:.4g}", fill="black")
        draw.text((left - 45, h - m - 10), f"{lo:.4g}", fill="black")
        for j, script in enumerate(SCRIPTS):
            pts = sorted((r["train_seconds"] / 60, v) for r, v in zip(rows, values) if r["script"] == script)
            xy = [(left + mi / x_max * (right - left), h - m - (v - lo) / (hi - lo) * (h - 2 * m)) for mi, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=COLOURS[script], width=2)
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[script])
            draw.text((left + 90 * j, 28), script, fill=COLOURS[script])
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[2, 5, 10, 20])
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--cache-dir", default="runs/evaluate_cache")
    p.add_argument("--out-dir", default="runs/curve")
    p.add_argument("--plot-only", action="store_true", help="redraw curve.png from curve.csv")
    a = p.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    table = os.path.join(a.out_dir, "curve.csv")
    if not a.plot_only:
        for script in a.scripts:
            rate, batch = images_per_second(script)
            print(f"{script}: {rate:.0f} img/s at batch {batch}", flush=True)
            for minutes in a.minutes:
                row = run_point(script, minutes, rate, batch, a)
                print(row, flush=True)
                new = not os.path.exists(table)
                with open(table, "a", newline="") as f:
                    writer = csv.DictWriter(f, FIELDS)
                    if new:
                        writer.writeheader()
                    writer.writerow(row)
    rows = [{k: v if k == "script" else float(v) for k, v in r.items()} for r in csv.DictReader(open(table))]
    plot(rows, os.path.join(a.out_dir, "curve.png"))
    print(f"wrote {a.out_dir}/curve.png from {len(rows)} runs")


if __name__ == "__main__":
    raise SystemExit(cli(main))
