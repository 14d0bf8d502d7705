"""FID between a folder of real images and a folder of generated ones (pytorch-fid's InceptionV3 and maths).

    python tools/eval/eval_fid.py --real_dir data/train_images --gen_dir output/samples_lora
    python tools/eval/eval_fid.py --real_dir data/train_images --save_stats real.npz --gen_dir output/a
    python tools/eval/eval_fid.py --real_stats real.npz --gen_dir output/b --backend ms

Protocol, preprocessing choices and weights: docs/evaluation.md.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from msd_lora.cli.errors import exits_on_user_error
from msd_lora.cli.eval_common import add_backend_args, check_statistics_args, print_notes, write_json
from msd_lora.errors import ConfigError
from msd_lora.eval.preprocess import DEFAULT_RESIZE, PROTOCOLS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fréchet Inception Distance between two image folders.")
    p.add_argument("--real_dir", default=None, help="real images (searched recursively)")
    p.add_argument("--gen_dir", required=True, help="generated images; a text_to_image.py output folder means its "
                                                    "samples/ subfolder")
    p.add_argument("--real_stats", default=None, help="use saved real-set statistics (.npz, mu/sigma) "
                                                      "instead of --real_dir")
    p.add_argument("--save_stats", default=None, help="save the real-set statistics to this .npz")
    p.add_argument("--inception_weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (or a .safetensors copy); default: cache, "
                        "else download")
    p.add_argument("--resize", default=DEFAULT_RESIZE, choices=tuple(PROTOCOLS),
                   help="preprocessing protocol: bilinear = pytorch-fid, pil_bicubic = clean-fid, "
                        "pil_bilinear = torchmetrics")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--output_json", default=None, help="also write the result here")
    add_backend_args(p)
    return p


def run(args: argparse.Namespace) -> dict:
    from msd_lora.eval.fid import FidEvaluator, fid_image_set

    if args.real_stats and args.save_stats:
        raise ConfigError("--save_stats saves statistics computed from --real_dir; it cannot be used with "
                          "--real_stats")
    if bool(args.real_dir) == bool(args.real_stats):
        raise ConfigError("give --real_dir DIR or --real_stats FILE.npz (one of them)")
    check_statistics_args(args.real_stats, args.save_stats)  # bad input fails before the network loads
    for folder, what in ((args.real_dir, "--real_dir"), (args.gen_dir, "--gen_dir")):
        if folder:
            fid_image_set(folder, what)
    evaluator = FidEvaluator(args.backend, args.inception_weights, args.resize, args.batch_size, args.device,
                             args.ms_mode, args.progress)
    real = evaluator.real_statistics(args.real_dir, args.real_stats, args.save_stats)
    return evaluator.fid(real, args.gen_dir)


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    print_notes(result["notes"])
    if args.output_json:
        write_json(args.output_json, result)
    num_real = "unknown" if result["num_real"] is None else result["num_real"]
    print(f"FID: {result['fid']:.4f}  ({result['num_gen']} generated vs {num_real} real images, "
          f"--resize {result['resize']} = {result['protocol']}, backend {result['backend']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
