#!/usr/bin/env python
"""How close are sample folders to a reference image set in texture? (the demo's "did the LoRA learn it" check)

    python tools/compare_samples.py --reference msd_lora/assets/tiny_lora_data --samples out/base out/lora

Prints, per folder, the mean high-frequency energy (mean |Laplacian| of the grey image: flat shapes score
low, the "sks" stripes high) and its distance to the reference set's mean.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msd_lora.data.synthetic import high_frequency_energy  # noqa: E402

EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def folder_energy(folder: Path) -> tuple[float, int]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and not p.name.startswith("grid"))
    if not files:
        raise SystemExit(f"error: no images ({', '.join(sorted(EXTENSIONS))}) under {folder}")
    values = [high_frequency_energy(np.asarray(Image.open(p).convert("RGB"))) for p in files]
    return float(np.mean(values)), len(files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, type=Path)
    p.add_argument("--samples", required=True, nargs="+", type=Path)
    args = p.parse_args()
    ref, n = folder_energy(args.reference)
    print(f"{'folder':<48} {'images':>6} {'hf energy':>10} {'distance to reference':>22}")
    print(f"{str(args.reference):<48} {n:>6} {ref:>10.2f} {0.0:>22.2f}")
    for folder in args.samples:
        value, n = folder_energy(folder)
        print(f"{str(folder):<48} {n:>6} {value:>10.2f} {abs(value - ref):>22.2f}")


if __name__ == "__main__":
    main()
