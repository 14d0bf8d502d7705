#!/usr/bin/env python
"""How close are sample folders to a reference image set in colour style? (the demo's "did the LoRA learn it")

    python tools/compare_samples.py --reference msd_lora/assets/tiny_lora_data --samples out/base out/lora

Prints, per folder, the mean colour signature (mean R, G, B and saturation) and its Euclidean distance to the
reference set's: sepia "sks" pictures are brown and unsaturated, the base model's flat and vivid.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msd_lora.data.synthetic import colour_signature, style_distance  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def folder_images(folder: Path) -> list[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.name.startswith("grid"))
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(EXTENSIONS))}) under {folder}")
    return [np.asarray(Image.open(p).convert("RGB")) for p in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--samples", required=True, nargs="+", type=Path)
    args = p.parse_args()
    reference = folder_images(args.reference)
    print(f"{'folder':<44} {'images':>6} {'mean R, G, B, saturation':>26} {'style distance':>15}")
    for folder in [args.reference, *args.samples]:
        images = folder_images(folder)
        signature = np.mean([colour_signature(im) for im in images], axis=0).round().astype(int)
        print(f"{str(folder):<44} {len(images):>6} {str(list(signature)):>26} "
              f"{style_distance(images, reference):>15.1f}")


if __name__ == "__main__":
    main()
