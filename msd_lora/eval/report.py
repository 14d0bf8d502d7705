"""What evaluation prints and writes: the random- and non-standard-weights notes, the results table and the bar
chart."""
from __future__ import annotations

import sys
from pathlib import Path

RULE = "!" * 100


def loud_random_warning(what: str, source: str) -> str:
    """Print a banner that `what` is randomly initialised; return a one-line note for results files."""
    print(f"{RULE}\n!! {what} has RANDOMLY INITIALISED weights ({source}).\n!! The numbers exercise the pipeline "
          f"only: they are NOT comparable to published FID / CLIP scores.\n{RULE}", file=sys.stderr)
    return f"{what} is randomly initialised ({source}): numbers not comparable to published scores"


def nonstandard_weights_note(path: str, sha256: str) -> str:
    """The note for FID weights that are neither pytorch-fid's standard file nor marked random."""
    from msd_lora.eval.weights import FID_WEIGHTS_NAME, FID_WEIGHTS_SHA256_PREFIX

    return (f"the FID InceptionV3 weights {path} (sha256 {sha256[:16]}...) are not the standard FID weights "
            f"(pytorch-fid's {FID_WEIGHTS_NAME}, sha256 {FID_WEIGHTS_SHA256_PREFIX}...): FID numbers are not "
            f"comparable to published FID")


def markdown_table(rows: list[dict], caption: str = "") -> str:
    """mindone's results-table shape: | Model | Task | Dataset | FID ↓ | CLIP score ↑ |, one row per run."""
    lines = ["| Model | Task | Dataset | FID ↓ | CLIP score ↑ |", "|---|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['task']} | {r['dataset']} | {r['fid']:.2f} | {r['clip_score']:.2f} |"
              for r in rows]
    return "\n".join(lines) + (f"\n\n{caption}\n" if caption else "\n")


COLOURS = [(96, 110, 130), (214, 120, 40), (70, 150, 90), (150, 80, 160)]


def bar_chart(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """A PNG with one panel per metric (FID, CLIP score), one labelled bar per run; drawn with PIL."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin, top = 300, 260, 40, 50
    image = Image.new("RGB", (2 * panel_w + 3 * margin, panel_h + top + margin // 2), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title, fill="black")
    metrics = (("fid", "FID (lower is better)"), ("clip_score", "CLIP score (higher is better)"))
    for p, (metric, label) in enumerate(metrics):
        x0, y0 = margin + p * (panel_w + margin), top
        base_y = y0 + panel_h - 20
        draw.text((x0, y0 - 16), label, fill="black")
        draw.line([(x0, base_y), (x0 + panel_w, base_y)], fill="black")
        peak = max(max(r[metric] for r in rows), 1e-9)  # FID of near-identical sets can round below 0: bar at 0
        width = panel_w // (2 * len(rows) + 1)
        for i, row in enumerate(rows):
            left = x0 + width * (2 * i + 1)
            height = max(0, int((panel_h - 60) * row[metric] / peak))
            draw.rectangle([left, base_y - height, left + width, base_y], fill=COLOURS[i % len(COLOURS)])
            draw.text((left, base_y - height - 14), f"{row[metric]:.2f}", fill="black")
            draw.text((left, base_y + 4), row["label"], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
