#!/usr/bin/env python
"""How close are sample folders to a reference image set in colour style, and do they still show what their prompts
asked for? (the demo's "did the LoRA learn the style, and keep the content")

    python tools/compare_samples.py --reference msd_lora/assets/tiny_lora_data --samples out/base out/lora

Prints, per folder, the mean colour signature (mean R, G, B and saturation) and its Euclidean distance to the
reference set's (msd_lora.eval.style): sepia "sks" pictures are brown and unsaturated, the base model's flat and
vivid; and for folders text_to_image.py wrote (their samples.jsonl names each image's prompt), the share of
images that show the prompted shape (msd_lora.eval.content, the tiny model's world).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import ImageInputError
from msd_lora.eval.content import content_rate
from msd_lora.eval.images import IMAGE_EXTENSIONS, prompted_samples, read_rgb
from msd_lora.eval.style import colour_signature, style_distance


def content_kept(folder: Path) -> str:
    """The share of a text_to_image.py folder's images that keep their prompt's content, or '-' for other folders."""
    samples = prompted_samples(folder)
    return "-" if samples is None else f"{content_rate(*samples):.0%}"


def folder_images(folder: Path) -> list[np.ndarray]:
    """The folder's images (recursively, grids left out) as uint8 RGB arrays."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("grid"))
    if not files:
        raise ImageInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return [read_rgb(p)[0] for p in files]


@exits_on_user_error
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--samples", required=True, nargs="+", type=Path)
    add_debug_flag(p)
    args = p.parse_args(argv)
    reference = folder_images(args.reference)
    print(f"{'folder':<44} {'images':>6} {'mean R, G, B, saturation':>26} {'style distance':>15} "
          f"{'content kept':>13}")
    for folder in [args.reference, *args.samples]:
        images = folder_images(folder)
        signature = np.mean([colour_signature(im) for im in images], axis=0).round().astype(int)
        print(f"{str(folder):<44} {len(images):>6} {str(list(signature)):>26} "
              f"{style_distance(images, reference):>15.1f} {content_kept(folder):>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
