#!/usr/bin/env python
"""Regenerate the option table in docs/configs.md from msd_lora.config.TrainConfig (a test checks it is current)."""
from __future__ import annotations

from msd_lora.config import REPO_ROOT, TrainConfig
from msd_lora.options import fields_of, range_text, to_plain

DOC = REPO_ROOT / "docs/configs.md"
BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"


def option_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, info in fields_of(TrainConfig).items():
        s = info.setting
        meaning = s.help
        if s.choices:
            meaning += f" (one of: {', '.join(map(str, s.choices))})"
        elif s.low is not None or s.high is not None:
            meaning += f" ({range_text(s)})"
        if s.path:
            meaning += "; a path"
        rows.append(f"| `{key}` | {info.type_name()} | `{to_plain(info.default)!r}` | {meaning} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{option_table()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"wrote {DOC}")
