"""`python text_to_image.py --prompt "..." [--use_lora True --lora_ckpt_path a.safetensors --lora_scale 0.8]`.

Argument names follow mindone's SD text_to_image.py. Images go to {output_path}/samples/NNNNN.png in
prompt order (n_iter x n_samples consecutive images per prompt), a grid per prompt to
{output_path}/grid-PPP.png, and one json line per image to {output_path}/samples.jsonl. A folder holding an
earlier sampling run's images is refused unless --overwrite True (which replaces them): FID and CLIP score read
every image in the folder, and stale ones would count.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.config import REPO_ROOT
from msd_lora.errors import ConfigError
from msd_lora.options import add_arguments, coerce_all, number, str_to_bool

TINY_MODEL = REPO_ROOT / "msd_lora/assets/tiny_sd"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The base model and where it runs (text_to_image.py and run_eval.py)."""
    p.add_argument("--pretrained_model_path", default=str(TINY_MODEL),
                   help="base model: a diffusers folder, an LDM single file (.safetensors/.ckpt) or a mindone .ckpt")
    p.add_argument("--model_config", default="",
                   help="architecture + schedule yaml (default: the diffusers folder's own configs, or the SD "
                        "version detected from a single file's weights)")
    p.add_argument("--backend", default="torch", choices=("torch", "mindspore"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] / gpu (torch), or ascend (MindSpore)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """The sampling options (msd_lora.sample.SamplingOptions), under mindone's flag names."""
    from msd_lora.sample import SamplingOptions

    add_arguments(p.add_argument_group("sampling"), SamplingOptions)


def sampling_options(args: argparse.Namespace) -> Any:
    """The SamplingOptions the command line gave (checked: ranges, finite numbers, sampler names)."""
    from msd_lora.options import fields_of
    from msd_lora.sample import SamplingOptions

    given = {k: v for k, v in vars(args).items() if k in fields_of(SamplingOptions)}
    return SamplingOptions(**coerce_all(SamplingOptions, given, {k: "command line" for k in given}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample Stable Diffusion images, optionally with LoRAs merged in.")
    p.add_argument("--prompt", default=None, help="prompt text (or use --data_path)")
    p.add_argument("--data_path", default=None, help="a .txt file of prompts, one per line (UTF-8)")
    add_model_arguments(p)
    p.add_argument("--use_lora", type=str, default=None,
                   help="merge the --lora_ckpt_path file(s) into the model (implied by --lora_ckpt_path)")
    p.add_argument("--lora_ckpt_path", action="append", default=[],
                   help="LoRA file (diffusers, kohya/A1111, mindone; detected); repeat to mix several")
    p.add_argument("--lora_scale", action="append", default=[],
                   help="strength per LoRA file (default 1.0); W' = W + scale * alpha/r * B@A")
    p.add_argument("--embedding_path", action="append", default=[],
                   help="textual-inversion embedding (A1111 / kohya emb_params or .pt, diffusers learned_embeds); "
                        "repeat for several. Embeddings bundled in a --lora_ckpt_path file load too")
    p.add_argument("--embedding_token", action="append", default=[],
                   help="the word a prompt uses for the embedding of the same position (default: the name the file "
                        "records, else its file name)")
    add_sampling_arguments(p)
    p.add_argument("--grid_scale", type=int, default=1, help="nearest-neighbour upscale of the grids (tiny models)")
    p.add_argument("--output_path", default="output/samples_run")
    p.add_argument("--overwrite", type=str, default="False",
                   help="replace the images of an earlier sampling run in output_path (otherwise it is refused)")
    add_debug_flag(p)
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    from msd_lora.data.prompts import read_prompts_file

    if args.data_path:
        return read_prompts_file(args.data_path, what="--data_path prompts file")
    if args.prompt is None:
        raise ConfigError("give --prompt TEXT or --data_path PROMPTS.txt")
    return [args.prompt]


def flag_bool(value: str | None, flag: str) -> bool | None:
    try:
        return None if value is None else str_to_bool(value)
    except ValueError as err:
        raise ConfigError(f"command line: {flag} {err}") from err


def lora_pairs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(path, scale) of each LoRA to merge: --lora_ckpt_path uses its files unless --use_lora False says not to."""
    from msd_lora.lora.formats import lora_file_path

    use = flag_bool(args.use_lora, "--use_lora")
    paths = args.lora_ckpt_path
    if use is False:
        if paths:
            raise ConfigError("--lora_ckpt_path was given with --use_lora False: drop one of them")
        return []
    if not paths:
        if use:
            raise ConfigError("--use_lora True needs --lora_ckpt_path FILE")
        return []
    scales = []
    for text in args.lora_scale or ["1.0"]:
        try:
            scales.append(number(text))
        except ValueError as err:
            raise ConfigError(f"command line: --lora_scale must be a finite number, got {text!r}") from err
    if len(scales) == 1 and len(paths) > 1:
        scales = scales * len(paths)
    if len(scales) != len(paths):
        raise ConfigError(f"{len(paths)} --lora_ckpt_path values but {len(scales)} --lora_scale values")
    for path in paths:
        lora_file_path(path)  # exists: checked before the model loads
    return list(zip(paths, scales))


def embedding_files(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(path, token or None) of each --embedding_path, checked to exist before the model loads."""
    from msd_lora.errors import MissingPathError

    paths, tokens = args.embedding_path, args.embedding_token
    if len(tokens) > len(paths) or (tokens and len(tokens) != len(paths)):
        raise ConfigError(f"{len(tokens)} --embedding_token values for {len(paths)} --embedding_path values: give one "
                          f"per file, in the same order")
    for path in paths:
        if not Path(path).is_file():
            raise MissingPathError(f"--embedding_path {path} does not exist")
    return list(zip(paths, tokens or [None] * len(paths)))


@exits_on_user_error
def main(argv: list[str]) -> int:
    from msd_lora import sample
    from msd_lora.backends.base import BackendOptions
    from msd_lora.output_folder import OutputFolder

    args = build_parser().parse_args(argv)
    options, prompts, loras = sampling_options(args), read_prompts(args), lora_pairs(args)
    embeddings = embedding_files(args)
    folder = OutputFolder(args.output_path, sample.SAMPLE_OUTPUTS, "sampling run",
                          overwrite=bool(flag_bool(args.overwrite, "--overwrite")))
    folder.check()
    pipeline, notes = sample.load_pipeline(args.pretrained_model_path, args.model_config, args.backend,
                                    BackendOptions(device=args.device))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    pipeline.check(options)
    for name in sample.load_embeddings(pipeline, embeddings, [path for path, _ in loras]):
        print(f"embedding {name} loaded", file=sys.stderr)
    if loras:
        sample.merge_loras(pipeline.backend, sample.read_lora_files(loras, pipeline.module_index))
        for note in sample.follow_lora_training(pipeline, [path for path, _ in loras]):
            print(f"note: {note}", file=sys.stderr)
    with folder.claimed() as out:
        if folder.replaced:
            print(f"replacing the earlier sampling run in {out} ({', '.join(folder.replaced)})", file=sys.stderr)
        sample.write_samples(pipeline, prompts, options, Path(out), loras, args.grid_scale)
    print(f"samples in {Path(args.output_path) / 'samples'}, grids in {args.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
