#!/usr/bin/env python
"""Convert a Stable Diffusion 1.x / 2.x base model between diffusers, original LDM and mindone layouts.

    python tools/convert_model.py v1-5-pruned-emaonly.safetensors sd15/ --to diffusers
    python tools/convert_model.py sd15/ sd15.safetensors --to ldm --dtype fp16
    python tools/convert_model.py sd15.safetensors sd_v1.5.ckpt --to mindone

IN is a diffusers folder, an LDM single file (.safetensors, or a pickled .ckpt read without running code)
or a mindone .ckpt; the SD version is detected from the weights unless --model_config names it. Every
tensor converts exactly (only --dtype changes values).
"""
from __future__ import annotations

import argparse
import sys

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.models.export import MODEL_FORMATS, save_model
from msd_lora.models.pretrained import load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input", help="diffusers folder, LDM .safetensors/.ckpt, or mindone .ckpt")
    p.add_argument("output", help="a folder (--to diffusers; a diffusers model already there is replaced whole), "
                                  "*.safetensors (--to ldm) or *.ckpt (--to mindone)")
    p.add_argument("--to", required=True, choices=MODEL_FORMATS)
    p.add_argument("--model_config", default="", help="model yaml (default: detected / the folder's configs)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=None, help="cast floats (default: keep)")
    p.add_argument("--ema", action="store_true", help="LDM files with EMA weights: take the UNet's EMA copy")
    add_debug_flag(p)
    return p


@exits_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model, cfg = load_model(args.input, args.model_config or None, use_ema=args.ema)
    if model.metadata.get("note"):
        print(f"note: {model.metadata['note']}", file=sys.stderr)
    out = save_model(model, cfg, args.output, args.to, args.dtype)
    print(f"wrote {out} ({args.to}, {cfg.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
