"""Records every parity measurement next to its bound; `MSD_LORA_PARITY_REPORT=file.json` writes them out.

    MSD_LORA_PARITY_REPORT=benchmarks/results/parity_cpu.json pytest tests/parity
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import pytest

_measured: list[dict] = []


@pytest.fixture(scope="session")
def measured():
    """`measured(name, value, bound, kind)`: keep a measurement for the report; returns the value."""

    def record(name: str, value: float, bound: float, kind: str = "<=") -> float:
        _measured.append({"check": name, "value": float(value), "bound": bound, "kind": kind})
        return value

    yield record
    target = os.environ.get("MSD_LORA_PARITY_REPORT")
    if target and _measured:
        import mindspore
        import torch

        report = {"machine": platform.machine(), "torch": torch.__version__, "mindspore": mindspore.__version__,
                  "mindspore_device": mindspore.get_context("device_target"), "checks": _measured}
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=2) + "\n")
