"""Write randomly initialised feature networks for offline demos and tests (make eval): an FID InceptionV3 in
pytorch-fid's weight layout and a CLIP of ViT-L/14's structure at reduced width, both marked random in their
safetensors metadata so every tool that loads them warns that its numbers are not comparable to published ones.

    python tools/eval/make_random_feature_networks.py --output_path output/eval/random_networks
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.config import REPO_ROOT

INCEPTION_FILE, CLIP_FOLDER = "inception_random.safetensors", "clip_random"


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    from msd_lora.eval.random_clip import write_random_clip
    from msd_lora.eval.weights import write_random_inception

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_path", default="output/eval/random_networks")
    p.add_argument("--tokenizer_dir", default=str(REPO_ROOT / "msd_lora/assets/tiny_sd/tokenizer"),
                   help="a CLIP BPE tokenizer folder for the random CLIP")
    p.add_argument("--clip_width", type=int, default=64, help="hidden size of both CLIP towers")
    p.add_argument("--seed", type=int, default=0)
    add_debug_flag(p)
    args = p.parse_args(argv)
    out = Path(args.output_path)
    inception = write_random_inception(out / INCEPTION_FILE, args.seed)
    clip = write_random_clip(out / CLIP_FOLDER, args.tokenizer_dir, args.seed, args.clip_width)
    print(f"random FID InceptionV3: {inception}\nrandom CLIP: {clip}\n"
          f"(randomly initialised: numbers computed with them are not comparable to published scores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
