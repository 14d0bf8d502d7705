#!/usr/bin/env python
"""Did a DreamBooth LoRA learn its subject for its token only? (the tiny model's DreamBooth example)

    python tools/subject_shown.py --samples out/base out/dreambooth out/pivotal --grid docs/images/dreambooth_tiny.png

For folders text_to_image.py wrote (samples.jsonl names each image's prompt), prints per prompt the share of
samples whose foreground is the subject's cyan (`msd_lora.eval.tiny_world.SUBJECT_COLOUR`, a colour pretraining never
showed) and, for prompts that name a colour ("a blue circle ..."), the share drawn in that colour. A learnt subject
shows for the prompts with its token and not for the class prompt. With `--base` (the base model's samples of the same
prompts and seeds), also the mean absolute pixel difference (0-255) from them: prior preservation keeps the class
prompt's samples near the base model's. `--grid` writes one picture: a labelled row of samples per folder and prompt.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import ImageInputError
from msd_lora.eval.images import prompted_samples
from msd_lora.eval.tiny_world import SUBJECT, drawn_colour, prompted_colour
from msd_lora.sample import image_grid, save_png

LABEL_HEIGHT = 14  # pixels above each row of the grid, for its label


def subject_rates(groups: dict[str, np.ndarray]) -> dict[str, tuple[int, float, float | None]]:
    """Per prompt of `by_prompt`'s groups: (images, share showing the subject, share in the prompted colour or
    None when the prompt names no colour)."""
    rates = {}
    for prompt, images in groups.items():
        colours, asked = [drawn_colour(image) for image in images], prompted_colour(prompt)
        rates[prompt] = (len(colours), float(np.mean([c == SUBJECT for c in colours])),
                         None if asked is None else float(np.mean([c == asked for c in colours])))
    return rates


def by_prompt(images: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """A folder's images grouped by prompt, in file order."""
    groups: dict[str, list[np.ndarray]] = {}
    for image, prompt in zip(images, prompts):
        groups.setdefault(prompt, []).append(image)
    return {prompt: np.stack(group) for prompt, group in groups.items()}


def difference(images: np.ndarray, base: np.ndarray | None) -> str:
    """Mean absolute pixel difference from the base model's samples of the same prompt and seeds, or '-'."""
    if base is None or base.shape != images.shape:
        return "-"
    return f"{np.abs(images.astype(np.float64) - base).mean():.1f}"


def labelled_rows(rows: list[tuple[str, np.ndarray]], upscale: int) -> np.ndarray:
    """One picture: each (label, images) row's images side by side, upscaled, under its label."""
    from PIL import Image, ImageDraw

    tiles = [np.asarray(Image.fromarray(image_grid(images, columns=len(images))).resize(
        (images.shape[2] * len(images) * upscale, images.shape[1] * upscale), Image.NEAREST)) for _, images in rows]
    width = max(tile.shape[1] for tile in tiles)
    canvas = Image.new("RGB", (width, sum(LABEL_HEIGHT + tile.shape[0] for tile in tiles)), "white")
    draw, top = ImageDraw.Draw(canvas), 0
    for (label, _), tile in zip(rows, tiles):
        draw.text((3, top + 1), label, fill="black")
        canvas.paste(Image.fromarray(tile), (0, top + LABEL_HEIGHT))
        top += LABEL_HEIGHT + tile.shape[0]
    return np.asarray(canvas)


def read_samples(folder: Path) -> tuple[list[np.ndarray], list[str]]:
    samples = prompted_samples(folder)
    if samples is None:
        raise ImageInputError(f"{folder} has no samples.jsonl: pass folders text_to_image.py wrote")
    return samples


@exits_on_user_error
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, nargs="+", type=Path, help="folders text_to_image.py wrote")
    p.add_argument("--base", type=Path, help="the base model's samples of the same prompts and seeds (a folder "
                                             "text_to_image.py wrote): adds the pixel difference from them")
    p.add_argument("--grid", type=Path, help="also write the samples as one labelled picture here (.png)")
    p.add_argument("--per_row", type=int, default=10, help="samples per prompt in the grid")
    p.add_argument("--upscale", type=int, default=2, help="nearest-neighbour upscale of the grid's samples")
    add_debug_flag(p)
    args = p.parse_args(argv)
    base = by_prompt(*read_samples(args.base)) if args.base else {}
    width = max(len(str(folder)) for folder in args.samples)
    print(f"{'folder':<{width}} {'prompt':<42} {'images':>6} {'subject':>8} {'prompted colour':>16} {'vs base':>8}")
    rows = []
    for folder in args.samples:
        groups = by_prompt(*read_samples(folder))
        for prompt, (count, subject, colour) in subject_rates(groups).items():
            kept = "-" if colour is None else f"{colour:.0%}"
            print(f"{str(folder):<{width}} {prompt:<42} {count:>6} {subject:>8.0%} {kept:>16} "
                  f"{difference(groups[prompt], base.get(prompt)):>8}")
            rows.append((f"{folder.name}: {prompt}", groups[prompt][:args.per_row]))
    if args.grid:
        save_png(args.grid, labelled_rows(rows, args.upscale))
        print(f"grid: {args.grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
