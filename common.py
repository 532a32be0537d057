"""What the scripts share: the timestep and position embeddings, and image saving (grids, the GIF, the loss plot)."""
import contextlib
import math
import os

import torch
import torchvision
from PIL import Image, ImageDraw


# ----------------------------------------------------------------------------- embeddings
def timestep_embedding(t, dim, max_period=10000):
    """(N,) float times -> (N, dim): [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), dim even."""
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

def pos_embed_2d(dim, grid):
    """Fixed 2-D sin-cos table (grid², dim): the first half of the channels encodes the row, the second the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([timestep_embedding(rows.flatten(), dim // 2), timestep_embedding(cols.flatten(), dim // 2)], 1)


# ----------------------------------------------------------------------------- images
def atomic_write(path, write):
    """write(temp file), then rename over `path`: a failure is an OSError naming the file and keeps the old one; a
    failure, Ctrl-C or SIGTERM leaves no temp file (a kill -9 may: the next run in the folder removes it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        kept = "; the previous one is kept" * os.path.exists(path)
        raise OSError(f"could not write {path} ({' '.join(str(e).split())}){kept}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)

def to_image(x, nrow, scale=2):
    """(N, C, H, W) in [0, 1] -> PIL grid, `nrow` a row, 2 px white lines, each pixel scale x scale."""
    g = torchvision.utils.make_grid(x.detach().float().cpu().clamp(0, 1), nrow=nrow, pad_value=1)[:x.shape[1]]
    img = Image.fromarray((g.permute(1, 2, 0).squeeze(-1) * 255 + 0.5).byte().numpy())
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)

def save_image(img, path, **options):
    """A PIL image in the format its name ends in (.png, .gif), written atomically; `options` go to PIL."""
    atomic_write(path, lambda f: img.save(f, os.path.splitext(path)[1][1:], **options))

def save_samples(draw, dev, classes, scales, out, tag, seed, view=lambda x: (x + 1) / 2, n=10):
    """One grid per CFG scale (row = class; scales None: an unconditional model) and a GIF of the last, from one
    batched draw(y, scale, gen, frames) -> (x, snapshots)."""
    y = torch.arange(classes, device=dev).repeat_interleave(n).repeat(len(scales or [1]))
    scale = torch.tensor(scales, device=dev).repeat_interleave(classes * n).view(-1, 1, 1, 1) if scales else None
    x, snaps = draw(y, scale, torch.Generator(dev).manual_seed(seed), frames=40)  # snaps: (N, C, H, W) each
    for i, s in enumerate(scales or [None]):
        name = f"grid_{tag}.png" if s is None else f"grid_{tag}_cfg{s:g}.png"
        save_image(to_image(view(x[i * classes * n:(i + 1) * classes * n]), n), os.path.join(out, name))
    gif = [to_image(view(f[-classes * n:]), n) for f in snaps]
    durations = [60] * len(gif[1:]) + [1500]  # ms a frame, the last held
    save_image(gif[0], f"{out}/denoise_{tag}.gif", save_all=True, append_images=gif[1:], duration=durations)
    return x, y

def save_loss(log, out, title, w=640, h=400, m=40):
    """loss.csv (step, mean loss since the row before) and loss.png (log10 loss against step, in a box)."""
    csv = "step,loss\n" + "".join(f"{s},{v:.6f}\n" for s, v in log)
    atomic_write(f"{out}/loss.csv", lambda f: f.write(csv.encode()))
    pts = [(s, math.log10(v)) for s, v in log if 0 < v < math.inf] or [(0, 0)]
    (s0, s1), (lo, hi) = [(min(p), max(p) + 1e-9) for p in zip(*pts)]  # step range, log10 loss range
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([m, m, w - m, h - m], outline="gray")
    draw.line([(m + (s - s0) / (s1 - s0) * (w - 2 * m), h - m - (v - lo) / (hi - lo) * (h - 2 * m)) for s, v in pts],
              fill=(31, 119, 180), width=2)
    draw.text((m, 10), f"{title}: {10 ** hi:.3g} (top) .. {10 ** lo:.3g} (bottom), log scale; steps {s0}..{s1:.0f}",
              fill="black")
    save_image(img, f"{out}/loss.png")
