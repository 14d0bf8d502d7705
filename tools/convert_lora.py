#!/usr/bin/env python
"""Convert a LoRA file between diffusers (peft), kohya/A1111, old diffusers and mindone formats.

    python tools/convert_lora.py my_lora.safetensors my_lora_kohya.safetensors --to kohya
    python tools/convert_lora.py civitai.safetensors canonical.safetensors --to diffusers
    python tools/convert_lora.py canonical.safetensors sd-72.ckpt --to mindone

The input format is detected. Names that depend on the model's layout (kohya's flattened paths, mindone's
LDM cell paths) are resolved against --base (any base model path) or --model_config, else the SD 1.x/2.x
layout. diffusers and kohya keep alpha exactly; old diffusers and mindone fold alpha/rank into lora_up.
"""
from __future__ import annotations

import argparse

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.lora.formats import FORMATS, read_lora, write_lora
from msd_lora.lora.module_index import ModuleIndex


def module_index(base: str, model_config: str) -> ModuleIndex:
    """The layout LoRA names resolve against: the base model's, the yaml's, or SD 1.x/2.x."""
    if base:
        from msd_lora.models.pretrained import load_model

        return ModuleIndex.from_configs(load_model(base, model_config or None)[0].configs)
    if model_config:
        from msd_lora.models.model_config import load_model_config

        return ModuleIndex.from_configs(load_model_config(model_config).architecture)
    return ModuleIndex.stable_diffusion()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("input", help="LoRA file in any supported format")
    p.add_argument("output", help="*.safetensors (diffusers, diffusers_old, kohya) or *.ckpt (mindone)")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--base", default="", help="base model the LoRA belongs to (for its layer names)")
    p.add_argument("--model_config", default="", help="model yaml instead of --base")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=None, help="cast the LoRA weights")
    add_debug_flag(p)
    return p


@exits_on_user_error
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    index = module_index(args.base, args.model_config)
    lora = read_lora(args.input, index)
    dtype = {"fp16": "float16", "fp32": "float32"}.get(args.dtype)
    out = write_lora(args.output, lora.weights, args.to, index, base_model=args.base, dtype=dtype,
                     embeddings=lora.embeddings)  # bundled embeddings go along unchanged
    print(f"wrote {out}: {len(lora.weights)} layers, {lora.format} -> {args.to}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
