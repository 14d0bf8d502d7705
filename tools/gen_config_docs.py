#!/usr/bin/env python
"""Regenerate the option table in docs/configs.md from msd_lora.config.OPTIONS (a test checks it is current)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from msd_lora.config import OPTIONS  # noqa: E402

DOC = REPO / "docs/configs.md"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def option_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, opt in OPTIONS.items():
        meaning = opt.help + (f" (one of: {', '.join(map(str, opt.choices))})" if opt.choices else "")
        rows.append(f"| `{key}` | {opt.kind.__name__} | `{opt.default!r}` | {meaning} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{option_table()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC}")
