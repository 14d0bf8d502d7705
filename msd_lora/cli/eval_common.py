"""Argument and output helpers the evaluation tools (tools/eval) share."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from msd_lora.options import str_to_bool

BACKEND_CHOICES = ("pt", "ms", "torch", "mindspore")


def add_backend_args(parser: argparse.ArgumentParser) -> None:
    from msd_lora.cli.errors import add_debug_flag

    parser.add_argument("--backend", default="pt", choices=BACKEND_CHOICES,
                        help="pt (PyTorch) or ms (MindSpore) runs the feature network")
    parser.add_argument("--device", default="auto", help="torch device (auto, cpu, cuda[:N]; gpu means cuda) or "
                                                         "MindSpore target (auto, cpu, gpu, ascend)")
    parser.add_argument("--ms_mode", type=int, default=0, choices=(0, 1),
                        help="MindSpore execution mode: 0 graph (compiles once, faster per image), 1 pynative")
    parser.add_argument("--progress", type=str_to_bool, default=True, help="show progress bars")
    add_debug_flag(parser)


def check_statistics_args(real_stats: str | None, save_stats: str | None = None) -> None:
    """--real_stats must be a readable statistics file and --save_stats an .npz name: checked before any network
    loads."""
    from msd_lora.eval.frechet import check_statistics_target, load_statistics

    if save_stats:
        check_statistics_target(save_stats)
    if real_stats:
        load_statistics(real_stats)


def write_json(path: str | Path, payload: dict) -> None:
    from msd_lora.files.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def write_jsonl(path: str | Path, records: list[dict]) -> str:
    """One JSON line per record; returns the path written."""
    from msd_lora.files.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
