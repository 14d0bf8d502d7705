"""Convert pytorch-fid's FID InceptionV3 weight file (.pth) to safetensors, checking it against our architecture,
so a machine without torch (MindSpore only) can load it: `eval_fid.py --backend ms --inception_weights X.safetensors`.
The copy records the .pth's sha256 (`source_sha256`): statistics saved with the .pth are accepted with the copy.

    python tools/eval/convert_inception_weights.py pt_inception-2015-12-05-6726825d.pth fid_inception.safetensors
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.eval import inception_arch as arch
from msd_lora.eval.weights import RANDOM_INIT_KEY, SOURCE_SHA256_KEY, read_inception_weights, weights_identity
from msd_lora.models.state_check import check_state_fits


@exits_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    from msd_lora.files.safetensors_file import write_safetensors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="the .pth file (read with torch.load(weights_only=True))")
    p.add_argument("target", help="the .safetensors file to write")
    add_debug_flag(p)
    args = p.parse_args(argv)
    state, found = read_inception_weights(args.source)
    check_state_fits(state, arch.state_shapes(), args.source, "the FID InceptionV3")
    # the copy keeps the weights' identity (the original .pth's sha256) and any random-init mark
    metadata = {"format": "pt", "source": found.get("source", Path(args.source).name),
                SOURCE_SHA256_KEY: weights_identity(args.source, found),
                **{k: found[k] for k in (RANDOM_INIT_KEY,) if k in found}}
    write_safetensors(args.target, state, metadata, dtype="float32")
    print(f"{args.target}: {len(state)} tensors from {args.source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
