#!/usr/bin/env python
"""Bake LoRAs into a base model, take them out again, or extract a LoRA from two models.

    python tools/merge_lora.py --base sd15.safetensors --lora a.safetensors:0.75 --lora b.safetensors:0.5 \\
        --out merged.safetensors --to ldm
    python tools/merge_lora.py --base merged.safetensors --lora a.safetensors:0.75 --lora b.safetensors:0.5 \\
        --unmerge --out restored.safetensors --to ldm
    python tools/merge_lora.py --extract --base sd15/ --tuned finetuned.safetensors --rank 32 \\
        --out extracted.safetensors --lora_format kohya

Merging computes W' = W + ratio * alpha/r * B @ A for every LoRA layer (in float64, once per weight);
--unmerge subtracts the same. --extract writes a LoRA approximating tuned - base by truncated SVD. The maths
is msd_lora.lora.merge; models and LoRAs may be in any format msd-lora reads.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import ConfigError
from msd_lora.lora.formats import FORMATS, read_lora, write_lora
from msd_lora.lora.merge import extract_lora, merge_into_state
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.models.export import MODEL_FORMATS, save_model
from msd_lora.models.pretrained import load_model

DEFAULT_RATIO = 0.75


def lora_and_ratio(text: str) -> tuple[str, float]:
    """'a.safetensors:0.5' -> ('a.safetensors', 0.5); no ratio -> the default 0.75. A path that itself holds a ':'
    is taken whole when it exists; anything else after the last ':' must be a number."""
    path, sep, ratio = text.rpartition(":")
    if not sep or Path(text).exists():
        return text, DEFAULT_RATIO
    try:
        value = float(ratio)
    except ValueError:
        value = math.nan
    if not path or not math.isfinite(value):
        raise ConfigError(f"--lora {text}: {ratio!r} is not a ratio; give FILE or FILE:RATIO with a number, e.g. "
                          f"{path or 'lora.safetensors'}:0.75")
    return path, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="base model (diffusers folder, LDM file, mindone ckpt)")
    p.add_argument("--lora", action="append", default=[],
                   help=f"LoRA file[:ratio] (default ratio {DEFAULT_RATIO}); repeat to merge several")
    p.add_argument("--out", required=True, help="output model (or LoRA file with --extract)")
    p.add_argument("--to", choices=MODEL_FORMATS, default="diffusers", help="output model format")
    p.add_argument("--model_config", default="", help="model yaml (default: detected)")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=None, help="cast the saved model")
    p.add_argument("--unmerge", action="store_true", help="subtract the LoRAs instead of adding them")
    p.add_argument("--extract", action="store_true", help="extract a LoRA from --tuned minus --base")
    p.add_argument("--tuned", default="", help="fine-tuned model for --extract")
    p.add_argument("--rank", type=int, default=32, help="rank of the extracted LoRA")
    p.add_argument("--conv", action="store_true", help="--extract: also convolutions (LoCon)")
    p.add_argument("--lora_format", choices=FORMATS, default="diffusers", help="--extract output format")
    add_debug_flag(p)
    return p


def merge(args) -> str:
    if not args.lora:
        raise ConfigError("give at least one --lora FILE[:ratio]")
    args.lora = [lora_and_ratio(text) for text in args.lora]
    model, cfg = load_model(args.base, args.model_config or None)
    index = ModuleIndex.from_configs(model.configs)
    sign = -1.0 if args.unmerge else 1.0
    loras = [(read_lora(path, index).weights, sign * ratio) for path, ratio in args.lora]
    model.state = merge_into_state(model.state, loras, source=", ".join(p for p, _ in args.lora))
    out = save_model(model, cfg, args.out, args.to, args.dtype)
    verb = "unmerged" if args.unmerge else "merged"
    return f"{verb} {len(loras)} LoRA(s) ({', '.join(f'{p}:{r}' for p, r in args.lora)}) -> {out}"


def extract(args) -> str:
    if not args.tuned:
        raise ConfigError("--extract needs --tuned MODEL")
    base, cfg = load_model(args.base, args.model_config or None)
    tuned, _ = load_model(args.tuned, cfg)
    flat = lambda m: {f"{n}.{k}": v for n in ("unet", "text_encoder") for k, v in m.state[n].items()}  # noqa: E731
    weights = extract_lora(flat(base), flat(tuned), args.rank, include_conv=args.conv)
    if not weights:
        raise ConfigError(f"{args.tuned} and {args.base} have the same weights in every layer considered")
    out = write_lora(args.out, weights, args.lora_format, ModuleIndex.from_configs(base.configs), base_model=args.base)
    return f"extracted a rank-{args.rank} LoRA on {len(weights)} layers -> {out}"


@exits_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    message = extract(args) if args.extract else merge(args)
    print(message)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
