"""CPU minutes to sample quality: each script's --quick recipe scaled by steps to a budget in minutes, 1000 samples
from each run scored by evaluate.py. Writes curve.csv (one row a run) and curve.png (FID and class accuracy against
the budget, one line a script). Time the rates on a quiet machine: they turn the budgets into steps.

    python curve.py --data-dir ../shared/data                                  # 1, 2, 5, 10 min, all three scripts
    python curve.py --data-dir ../shared/data --minutes 2 --scripts dit_ddpm   # one point
    python curve.py --plot-only --out-dir runs/curve                           # redraw curve.png from curve.csv

The steps for a budget come from the training rate, timed first on the script's own quick model (training steps on
random data); the plot puts each point at its budget, and curve.csv also holds the time each run measured (its
checkpoints and grids included, and whatever else ran beside it). A point is the script's run in
OUT/SCRIPT_Mmin (its checkpoint, grids, samples.npz, samples.eval.json, and curve.log: what the run printed).

What is promised:
  bad input  a bad flag (--minutes must be > 0 and < 10080: nan, inf, 0 or -5 are refused), data the scripts' loader
             refuses (missing, corrupt, too few images), an --out-dir that is not a writable folder, or a curve.csv
             that cannot be read back (missing, header only, a missing, empty or non-numeric cell, other columns, an
             unknown script): one line `error: ...` on stderr and exit code 2, before anything is trained or written.
  a failure  when a script or evaluate.py exits non-zero, its own last stderr line is curve.py's error and its exit
             code is curve.py's (128 + N if signal N killed it); the rows of the points done so far stay in curve.csv.
  reruns     into the same --out-dir continue the curve: a point with its row in curve.csv is skipped (so a rerun
             with more --minutes adds points, and one that was stopped goes on from the next point); a point whose
             run trained to its end (its curve.log says so) but was not scored is sampled (if samples.npz is
             missing) and scored, not trained again; a point folder holding a run that was stopped or failed while
             training (a ckpt.pt, no such curve.log) is refused before anything runs, in one line naming the folder
             to remove: a resume would lose its measured time. To redo a point, remove its folder and its row.
  signals    Ctrl-C (SIGINT) or SIGTERM is passed on to the running script or evaluate.py (each runs in its own
             process group, so a terminal's Ctrl-C reaches it once, through curve.py), which saves its checkpoint at
             the step it reached and exits; curve.py waits for it, then exits 130 / 143 with one line (`error:
             interrupted` / `error: terminated`), leaving no lock behind. Between runs the stop is immediate.
"""
import csv
import importlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw, ImageFont

from common import save_image
from harness import Parser, UsageError, cli, load_dataset, parse_args, pick_device, ranged

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ["dit_ddpm", "dit_flow", "ddpm_unet"]
COLOURS = {"dit_ddpm": (31, 119, 180), "dit_flow": (255, 127, 14), "ddpm_unet": (44, 160, 44)}
FIELDS = ["script", "minutes_asked", "steps", "train_seconds", "class_accuracy", "fid", "precision", "recall"]
MAX_MINUTES = 7 * 24 * 60  # a budget is under a week
TRAINED = re.compile(r"^trained (\d+) steps in ([\d.]+) s", re.M)  # the line each script prints at the end


# ----------------------------------------------------------------------------- config
def get_parser():
    p = Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=ranged(float, 0, MAX_MINUTES, strict=True), nargs="+", default=[1, 2, 5, 10],
                   help="training budgets in minutes, one run each per script")
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS)
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--cache-dir", default="runs/evaluate_cache", help="evaluate.py's classifier cache")
    p.add_argument("--out-dir", default="runs/curve")
    p.add_argument("--plot-only", action="store_true", help="redraw curve.png from curve.csv")
    return p


def recipe(script):
    """The script's module and its --quick flags (on the CPU)."""
    mod = importlib.import_module(script)
    return mod, parse_args(mod.get_parser, ["--quick", "--device", "cpu"], mod.QUICK, script)[0]


def folder(a, script, minutes):
    return os.path.join(a.out_dir, f"{script}_{minutes:g}min")


# ----------------------------------------------------------------------------- curve.csv
def read_rows(path, empty_ok=False):
    """curve.csv -> rows, numbers as floats; a file that is missing, holds no rows or a bad cell: one UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist: run curve.py without --plot-only first, or pass the --out-dir "
                         f"that holds it")
    rows = []
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != FIELDS:
                got = ",".join(reader.fieldnames or []) or "nothing"
                raise UsageError(f"{path} has the columns {got}; curve.py writes {','.join(FIELDS)}")
            for r in reader:
                rows.append(check_row(r, f"{path} line {reader.line_num}"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {path} ({' '.join(str(e).split())})")
    if not rows and not empty_ok:
        raise UsageError(f"{path} holds no runs (its header only): run curve.py without --plot-only first")
    return rows


def check_row(r, where):
    """A csv row (strings) -> the row with numbers, or one UsageError naming the line and the cell."""
    if None in r:
        raise UsageError(f"{where} has more cells than the {len(FIELDS)} columns")
    if r["script"] not in SCRIPTS:
        raise UsageError(f"{where}: script {r['script']!r} is not one of {', '.join(SCRIPTS)}")
    out = {"script": r["script"]}
    for k in FIELDS[1:]:
        v = (r[k] or "").strip()  # None: the row ends early
        if not v:
            raise UsageError(f"{where}: {k} is empty")
        try:
            out[k] = float(v)
        except ValueError:
            raise UsageError(f"{where}: {k} is {v!r}, not a number") from None
        if not math.isfinite(out[k]):
            raise UsageError(f"{where}: {k} is {v}; it must be a finite number")
    if not 0 <= out["class_accuracy"] <= 1:
        raise UsageError(f"{where}: class_accuracy is {out['class_accuracy']:g}; it must lie in 0..1")
    return out


def append_row(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# ----------------------------------------------------------------------------- the runs
def one_step(model, opt, obj, x, y):
    """One optimiser step as the scripts take it (the objective's loss, gradients clipped at 1)."""
    loss = obj.loss(model, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def images_per_second(script, steps=30):
    """Training rate of the script's --quick recipe on random data (the data loading is negligible)."""
    mod, a = recipe(script)
    torch.manual_seed(0)
    model, ema, opt, obj = mod.build(a, pick_device("cpu")[2])
    C, S, K = mod.DATA[a.dataset]
    x = torch.rand(a.batch_size, C, S, S) * 2 - 1
    y = torch.arange(a.batch_size) % K
    for _ in range(5):  # warm-up
        one_step(model, opt, obj, x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(model, opt, obj, x, y)
    return steps * a.batch_size / (time.perf_counter() - t0), a.batch_size


def state(out, done):
    """What a point's folder holds: 'done' (its row is in curve.csv), 'new' (no run), 'trained' (the run trained to
    its end, as its curve.log says, but is not scored yet) or 'stopped' (a run that did not train to its end, or one
    curve.py did not see end)."""
    if done:
        return "done"
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        return "new"
    log = os.path.join(out, "curve.log")
    return "trained" if os.path.isfile(log) and TRAINED.search(open(log).read()) else "stopped"


class Stops:
    """While inside: Ctrl-C and SIGTERM are passed on to the running child, which saves and exits, and curve.py stops
    after it (KeyboardInterrupt, which cli makes one line and 130 / 143); with no child running, at once."""

    def __enter__(self):
        self.caught, self.child, self.deferring = [], None, False
        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.old:
            signal.signal(s, self.handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)

    def handle(self, signum, frame):
        self.caught.append(signum)
        if self.child is not None:
            self.child.send_signal(signum)  # nothing once it has exited
        elif not self.deferring:
            raise KeyboardInterrupt(signum)

    def stop(self):
        if self.caught:
            raise KeyboardInterrupt(self.caught[0])

    def run(self, cmd):
        """cmd (a script or evaluate.py) in its own process group, its stdout echoed and kept in self.printed. A
        non-zero exit: its last stderr line, as a UsageError with its exit code."""
        print(" ".join(cmd), flush=True)
        self.printed = ""
        with tempfile.TemporaryFile("w+") as err:
            self.deferring = True  # a signal now is only noted: the child gets it once it exists
            try:
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
                self.child = proc
            finally:
                self.deferring = False
            if self.caught:
                proc.send_signal(self.caught[0])
            try:
                for line in proc.stdout:
                    print("  " + line, end="", flush=True)
                    self.printed += line
                proc.wait()
            finally:
                self.child = None
            err.seek(0)
            last = ([s for s in err.read().splitlines() if s.strip()] or [""])[-1].strip()
        rc = proc.returncode
        if rc and not self.caught:
            name = os.path.basename(cmd[1] if len(cmd) > 1 else cmd[0])
            why = f"{name} exited with code {rc}" if rc > 0 else f"{name} was killed by signal {-rc}"
            raise UsageError(last.removeprefix("error: ") or why, rc if rc > 0 else 128 - rc)


def run_point(script, minutes, rate, batch, a, stops):
    """Train for `minutes` at `rate` (rate None: the folder holds the run, trained), sample 1000 images (unless they
    are there), score them; -> the csv row."""
    out = folder(a, script, minutes)
    log, ckpt, npz = (os.path.join(out, f) for f in ("curve.log", "ckpt.pt", "samples.npz"))
    script_py = os.path.join(HERE, f"{script}.py")
    if rate:
        steps = max(1, round(minutes * 60 * rate / batch))
        try:
            stops.run([sys.executable, script_py, "--quick", "--max-steps", str(steps), "--data-dir", a.data_dir,
                       "--out-dir", out, "--device", "cpu", "--num-samples", "1000"])
        finally:
            if TRAINED.search(stops.printed):  # it trained to the end: a rerun samples and scores it
                with open(log, "w") as f:
                    f.write(stops.printed)
            elif stops.caught and os.path.exists(ckpt):
                print(f"stopped: {out} keeps the run at the step it reached; remove that folder to run this point "
                      f"again")
        stops.stop()
    else:
        print(f"{script} {minutes:g} min: trained before (see {log})", flush=True)
    found = TRAINED.search(open(log).read())
    if not found:
        raise UsageError(f"{script}.py printed no line 'trained N steps in S s' (see {log})", 1)
    steps, seconds = int(found.group(1)), float(found.group(2))
    if not os.path.exists(npz):  # stopped or failed while sampling
        stops.run([sys.executable, script_py, "--sample-only", "--ckpt", ckpt, "--num-samples", "1000",
                   "--device", "cpu"])
        stops.stop()
    dataset = recipe(script)[1].dataset
    stops.run([sys.executable, os.path.join(HERE, "evaluate.py"), f"{out}/samples.npz", "--data-dir", a.data_dir,
               "--cache-dir", a.cache_dir, "--dataset", dataset])
    stops.stop()
    r = json.load(open(f"{out}/samples.eval.json"))
    return dict(script=script, minutes_asked=minutes, steps=steps, train_seconds=round(seconds, 1),
                class_accuracy=r["class_accuracy"], fid=r["fid"], precision=r["precision"], recall=r["recall"])


def check_data(scripts, data_dir):
    """Every split the runs and evaluate.py read, through the scripts' loader: one UsageError before any training."""
    seen = set()
    for script in scripts:
        mod, a = recipe(script)
        if a.dataset not in seen:
            seen.add(a.dataset)
            for train in (True, False):
                load_dataset(a.dataset, data_dir, mod.DATA[a.dataset], a.batch_size if train else 1, train=train)


# ----------------------------------------------------------------------------- the plot
def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, ImportError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def ticks(lo, hi, n=5):
    """About n + 1 round tick values (steps of 1, 2, 2.5 or 5 x 10^k) from at most lo to at least hi."""
    if not hi > lo:  # one value: a span above it
        hi = lo + (abs(lo) / 10 or 1)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def label(v):
    return f"{v:g}"


def plot(rows, path, w=960, h=420):
    """Two panels, FID and class accuracy (%, at most 100) against the training budget in minutes, one line a script,
    labelled axes with numeric ticks and a legend; -> the ticks drawn: {"minutes", "fid", "class_accuracy"}."""
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    small, big = font(12), font(14)
    scripts = [s for s in SCRIPTS if any(r["script"] == s for r in rows)]
    minutes = [r["minutes_asked"] for r in rows]
    xt = ticks(0, max(minutes))
    drawn = {"minutes": xt}
    panels = [("FID (lower is better)", "FID", "fid"), ("class accuracy (higher is better)", "class accuracy %",
                                                          "class_accuracy")]
    for i, (title, axis, key) in enumerate(panels):
        x0 = i * w // 2
        left, right, top, bottom = x0 + 70, x0 + w // 2 - 20, 56, h - 56
        values = [100 * r[key] if key == "class_accuracy" else r[key] for r in rows]
        if key == "fid":
            yt = ticks(min(0, min(values)), max(values))
        else:  # the accuracy axis ends at 100 at most
            yt = [t for t in ticks(min(values), min(100, max(values))) if t <= 100]
            yt = yt if len(yt) > 1 else [yt[0] - 1, yt[0]]
        drawn[key] = yt
        sx = lambda m: left + (m - xt[0]) / (xt[-1] - xt[0]) * (right - left)  # noqa: E731
        sy = lambda v: bottom - (v - yt[0]) / (yt[-1] - yt[0]) * (bottom - top)  # noqa: E731
        draw.text((x0 + w // 4, 6), title, fill="black", font=big, anchor="ma")
        for t in yt:  # y ticks: a light grid line, a tick mark and the number
            y = sy(t)
            draw.line([(left, y), (right, y)], fill=(232, 232, 232))
            draw.line([(left - 5, y), (left, y)], fill="black")
            draw.text((left - 8, y), label(t), fill="black", font=small, anchor="rm")
        for t in xt:
            x = sx(t)
            draw.line([(x, bottom), (x, bottom + 5)], fill="black")
            draw.text((x, bottom + 8), label(t), fill="black", font=small, anchor="ma")
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text(((left + right) // 2, h - 22), "training budget (CPU minutes)", fill="black", font=small, anchor="ma")
        vertical(img, axis, x0 + 6, (top + bottom) // 2, small)
        for script in scripts:
            pts = sorted((r["minutes_asked"], v) for r, v in zip(rows, values) if r["script"] == script)
            xy = [(sx(m), sy(v)) for m, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=COLOURS[script], width=2)
            for px, py in xy:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=COLOURS[script])
        lx = left  # the legend: a short line of each script's colour and its name
        for script in scripts:
            draw.line([(lx, 36), (lx + 18, 36)], fill=COLOURS[script], width=3)
            draw.text((lx + 22, 36), script, fill="black", font=small, anchor="lm")
            lx += 32 + draw.textlength(script, font=small)
    save_image(img, path)
    return drawn


def vertical(img, text, x, y, font):
    """Text turned 90° (reading upwards), its left edge at x, centred on y."""
    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    strip = Image.new("L", (box[2] + 2, box[3] + 2), 0)
    ImageDraw.Draw(strip).text((1, 1), text, fill=255, font=font)
    strip = strip.rotate(90, expand=True)
    img.paste((0, 0, 0), (x, y - strip.height // 2), strip)


# ----------------------------------------------------------------------------- main
def main(argv=None):
    a = get_parser().parse_args(argv)
    table = os.path.join(a.out_dir, "curve.csv")
    if not a.plot_only:
        run_all(a, table)
    rows = read_rows(table)
    plot(rows, os.path.join(a.out_dir, "curve.png"))
    print(f"wrote {a.out_dir}/curve.png from {len(rows)} runs")


def run_all(a, table):
    """Every point not in curve.csv yet, each row appended as it is scored; all checks first."""
    done = {(r["script"], f"{r['minutes_asked']:g}") for r in read_rows(table, empty_ok=True)} \
        if os.path.exists(table) else set()
    points = {}  # script -> [(minutes, state)], each folder once
    for script in dict.fromkeys(a.scripts):
        for m in {f"{m:g}": m for m in a.minutes}.values():
            points.setdefault(script, []).append((m, state(folder(a, script, m), (script, f"{m:g}") in done)))
    stopped = [folder(a, s, m) for s, ps in points.items() for m, st in ps if st == "stopped"]
    if stopped:
        raise UsageError(f"{stopped[0]} holds a run that is not in {table} (stopped or failed): remove that folder "
                         f"to run the point again" + f" (and {len(stopped) - 1} more like it)" * (len(stopped) > 1))
    todo = {s: ps for s, ps in points.items() if any(st in ("new", "trained") for _, st in ps)}
    for s, ps in points.items():
        for m, st in ps:
            if st == "done":
                print(f"{s} {m:g} min: in {table}, skipped")
    if not todo:
        return
    check_data(todo, a.data_dir)
    try:
        os.makedirs(a.out_dir, exist_ok=True)
        writable = os.path.isdir(a.out_dir) and os.access(a.out_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise UsageError(f"--out-dir {a.out_dir} is not a writable folder")
    with Stops() as stops:
        for script, ps in todo.items():
            rate = batch = None
            for minutes, st in ps:
                if st == "done":
                    continue
                if st == "new" and rate is None:
                    rate, batch = images_per_second(script)
                    print(f"{script}: {rate:.0f} img/s at batch {batch}", flush=True)
                row = run_point(script, minutes, rate if st == "new" else None, batch, a, stops)
                print(row, flush=True)
                stops.deferring = True  # the row is written whole: a signal now stops after it
                try:
                    append_row(table, row)
                finally:
                    stops.deferring = False
                stops.stop()


if __name__ == "__main__":
    raise SystemExit(cli(main))
