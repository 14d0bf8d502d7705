"""CLIP score of generated images against their prompts: 100 * max(cos, 0) per image, averaged.

    python tools/eval/eval_clip_score.py --image_path_or_dir output/samples_lora --prompt_or_path prompts.txt
    python tools/eval/eval_clip_score.py --image_path_or_dir cat.png --prompt_or_path "a photo of a cat" --backend ms

Images pair with prompts in text_to_image.py's order: n_iter*n_samples consecutive images per prompt
(--images_per_prompt, default: images / prompts). Per-image scores go to --output_jsonl. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from msd_lora.cli.errors import exits_on_user_error
from msd_lora.cli.eval_common import add_backend_args, print_notes, write_json, write_jsonl
from msd_lora.eval.clip_model import DEFAULT_CLIP_MODEL


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="CLIP score between images and their prompts.")
    p.add_argument("--image_path_or_dir", required=True, help="an image, a folder of images (sorted, recursive) "
                                                              "or a text_to_image.py output folder")
    p.add_argument("--prompt_or_path", required=True, help="a prompt, or a .txt file with one prompt per line")
    p.add_argument("--images_per_prompt", type=int, default=None,
                   help="n_iter * n_samples of the sampling run (default: number of images / number of prompts)")
    p.add_argument("--ckpt_path", default=None, help="a local Hugging Face CLIP folder (config.json, "
                                                     "model.safetensors, tokenizer, preprocessor_config.json)")
    p.add_argument("--model_name", default=DEFAULT_CLIP_MODEL, help="Hub name, used when --ckpt_path is not given")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--output_jsonl", default="clip_scores.jsonl", help="per-image scores, one json line each")
    p.add_argument("--output_json", default=None, help="also write the summary here")
    add_backend_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    from msd_lora.eval.clip_eval import ClipScorer
    from msd_lora.eval.clip_score import read_prompts

    prompts = read_prompts(args.prompt_or_path)
    scorer = ClipScorer(args.backend, args.ckpt_path, args.model_name, args.batch_size, args.device, args.ms_mode,
                        args.progress)
    return scorer.score(args.image_path_or_dir, prompts, args.images_per_prompt)


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print_notes(result["notes"])
    write_jsonl(args.output_jsonl, result["records"])
    if args.output_json:
        write_json(args.output_json, {k: v for k, v in result.items() if k != "records"})
    print(f"CLIP score: {result['clip_score']:.4f}  ({result['num_images']} images, {result['num_prompts']} prompts, "
          f"backend {result['backend']}); per image: {args.output_jsonl}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
