#!/usr/bin/env python
"""Draw a loss curve from a CSV log as a PNG, with PIL only (no matplotlib needed).

    python tools/plot_loss.py output/demo/train_log.csv output/demo/loss.png
    python tools/plot_loss.py docs/tiny_model_pretrain.csv docs/images/tiny_pretrain_loss.png --group stage
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import DatasetError

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
W, H, MARGIN = 640, 360, 48


def read_series(path: Path, x: str, y: str, group: str | None) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            value = float(row[y])
            if math.isfinite(value) and value > 0:
                series.setdefault(row[group] if group else y, []).append((float(row[x]), value))
    if not series:
        raise DatasetError(f"no finite positive '{y}' values in {path}")
    return series


def plot(series: dict[str, list[tuple[float, float]]], title: str) -> Image.Image:
    """One panel per series (their x ranges differ), log-scale y."""
    panels = len(series)
    image = Image.new("RGB", (W, H * panels), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, points) in enumerate(series.items()):
        top = i * H
        xs, ys = [p[0] for p in points], [math.log10(p[1]) for p in points]
        x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1
        pixels = [(MARGIN + (x - x0) / ((x1 - x0) or 1) * (W - 2 * MARGIN),
                   top + H - MARGIN - (y - y0) / (y1 - y0) * (H - 2 * MARGIN)) for x, y in zip(xs, ys)]
        draw.rectangle([MARGIN, top + MARGIN, W - MARGIN, top + H - MARGIN], outline=(180, 180, 180))
        draw.line(pixels, fill=COLOURS[i % len(COLOURS)], width=2)
        draw.text((MARGIN, top + 12), f"{title} {name}: loss {points[0][1]:.3g} -> {points[-1][1]:.3g} "
                                      f"(log scale, x {x0:g}..{x1:g})", fill="black")
        draw.text((4, top + MARGIN), f"{10 ** y1:.3g}", fill="black")
        draw.text((4, top + H - MARGIN - 10), f"{10 ** y0:.3g}", fill="black")
    return image


@exits_on_user_error
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--x", default="step")
    p.add_argument("--y", default="loss")
    p.add_argument("--group", default=None, help="column that splits the rows into curves (e.g. stage)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot(read_series(args.csv, args.x, args.y, args.group), args.csv.stem).save(args.png)
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
