#!/usr/bin/env python
"""Draw loss curves from a CSV log as a PNG, with PIL only (no matplotlib needed).

    python tools/plot_loss.py output/demo/train_log.csv output/demo/loss.png      # training + validation loss
    python tools/plot_loss.py docs/tiny_model_pretrain.csv docs/images/tiny_pretrain_loss.png --group stage
"""
from __future__ import annotations

import argparse
from pathlib import Path

from msd_lora.cli.errors import add_debug_flag, exits_on_user_error
from msd_lora.errors import DatasetError
from msd_lora.loss_plot import plot_losses, plot_panels, read_series


@exits_on_user_error
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", type=Path)
    p.add_argument("png", type=Path)
    p.add_argument("--x", default="step")
    p.add_argument("--y", default="loss")
    p.add_argument("--group", default=None, help="column that splits the rows into curves (e.g. stage)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    if args.group:
        plot_panels(read_series(args.csv, args.x, args.y, args.group), args.csv.stem).save(args.png)
    elif plot_losses(args.csv, args.png) is None:
        raise DatasetError(f"no finite loss values in {args.csv}")
    print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
