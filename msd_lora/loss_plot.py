"""Loss curves as PNGs, drawn with PIL (no matplotlib needed).

`plot_losses`: a run's `{output}/loss.png`, the training loss per logged step (thin), its moving average (thick) and
the held-out validation loss (points joined), on one linear axis with step and loss ticks. `plot_panels`: one
log-scale panel per series of any CSV (`tools/plot_loss.py --group`, e.g. the tiny model's pretraining stages).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from msd_lora.errors import DatasetError
from msd_lora.files.atomic import atomic_path

PANEL_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
PANEL_W, PANEL_H, PANEL_MARGIN = 640, 360, 48
SIZE, MARGIN = (640, 400), (64, 24, 24, 44)  # width, height; left, top, right, bottom
COLOURS = {"train": (170, 190, 225), "average": (40, 80, 170), "validation": (215, 90, 30), "axis": (60, 60, 60)}


def read_curves(log_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """(step, value) series of `train_log.csv`: training loss and, where logged, validation loss."""
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "validation": []}
    with open(log_csv, newline="") as f:
        for row in csv.DictReader(f):
            for column, name in (("loss", "train"), ("val_loss", "validation")):
                value = row.get(column) or ""
                if value and math.isfinite(float(value)):
                    curves[name].append((float(row["step"]), float(value)))
    return curves


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    starts = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[starts]) / (np.arange(1, len(values) + 1) - starts)


def nice_ticks(low: float, high: float, count: int = 8) -> list[float]:
    span = (high - low) or abs(high) or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= count)
    return [v for v in np.arange(math.ceil(low / step) * step, high + step / 2, step)]


def plot_losses(log_csv: Path, out: Path) -> Path | None:
    """Draw the curves of `log_csv` into `out` (atomically); None when nothing was logged yet."""
    from PIL import Image, ImageDraw

    curves = read_curves(log_csv)
    if not curves["train"]:
        return None
    points = curves["train"] + curves["validation"]
    steps = [s for s, _ in points]
    values = np.array([v for _, v in points])
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = float(np.percentile(values, 1)), float(np.percentile(values, 99))
    y0, y1 = (y0, y1) if y1 > y0 else (y0 - 1, y1 + 1)
    left, top, right, bottom = MARGIN
    width, height = SIZE[0] - left - right, SIZE[1] - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        clipped = min(max(value, y0), y1)
        return left + (step - x0) / (x1 - x0) * width, top + (1 - (clipped - y0) / (y1 - y0)) * height

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + width, top + height], outline=COLOURS["axis"])
    for tick in nice_ticks(y0, y1):
        _, y = xy(x0, tick)
        draw.line([left - 4, y, left, y], fill=COLOURS["axis"])
        draw.text((4, y - 6), f"{tick:.3g}", fill=COLOURS["axis"])
    for tick in nice_ticks(x0, x1):
        x, _ = xy(tick, y0)
        draw.line([x, top + height, x, top + height + 4], fill=COLOURS["axis"])
        draw.text((x - 10, top + height + 8), f"{tick:g}", fill=COLOURS["axis"])
    draw.text((left + width // 2 - 12, SIZE[1] - 16), "step", fill=COLOURS["axis"])
    train = curves["train"]
    draw.line([xy(s, v) for s, v in train], fill=COLOURS["train"], width=1)
    smooth = moving_average(np.array([v for _, v in train]), max(1, len(train) // 20))
    draw.line([xy(s, v) for (s, _), v in zip(train, smooth)], fill=COLOURS["average"], width=2)
    if curves["validation"]:
        line = [xy(s, v) for s, v in curves["validation"]]
        draw.line(line, fill=COLOURS["validation"], width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLOURS["validation"])
    legend = [("training loss", "train"), ("moving average", "average")]
    legend += [("validation loss", "validation")] if curves["validation"] else []
    for i, (label, colour) in enumerate(legend):
        x, y = left + width - 150, top + 8 + 16 * i
        draw.line([x, y + 6, x + 20, y + 6], fill=COLOURS[colour], width=3)
        draw.text((x + 26, y), label, fill=COLOURS["axis"])
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out


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


def plot_panels(series: dict[str, list[tuple[float, float]]], title: str) -> Any:
    """One panel per series (their x ranges differ), log-scale y."""
    W, H, MARGIN = PANEL_W, PANEL_H, PANEL_MARGIN  # noqa: N806
    panels = len(series)
    from PIL import Image, ImageDraw

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
        draw.line(pixels, fill=PANEL_COLOURS[i % len(PANEL_COLOURS)], width=2)
        draw.text((MARGIN, top + 12), f"{title} {name}: loss {points[0][1]:.3g} -> {points[-1][1]:.3g} "
                                      f"(log scale, x {x0:g}..{x1:g})", fill="black")
        draw.text((4, top + MARGIN), f"{10 ** y1:.3g}", fill="black")
        draw.text((4, top + H - MARGIN - 10), f"{10 ** y0:.3g}", fill="black")
    return image
