"""Records every parity measurement next to its bound; `MSD_LORA_PARITY_REPORT=file.json` writes them out.

    MSD_LORA_PARITY_REPORT=benchmarks/results/parity_cpu.json pytest tests/parity
"""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import pytest

_measured: list[dict] = []


@pytest.fixture(scope="session", autouse=True)
def float32_on_accelerators():
    """Parity is float32 against float32: keep accelerators from computing float32 convs/matmuls in TF32 / HF32.

    CUDA torch runs convolutions in TF32 by default; Ascend (CANN, MindSpore 2.10) runs float32 convolutions in HF32
    by default (matmuls stay float32 under the default `must_keep_origin_dtype`). Both keep ~10 mantissa bits.
    """
    if os.environ.get("MSD_LORA_PARITY_TORCH_DEVICE", "cpu").startswith("cuda"):
        import torch

        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    if os.environ.get("MSD_LORA_PARITY_MS_DEVICE", "cpu").lower() == "ascend":
        import mindspore

        mindspore.device_context.ascend.op_precision.conv_allow_hf32(False)
        mindspore.device_context.ascend.op_precision.matmul_allow_hf32(False)
    yield


@pytest.fixture(scope="session")
def measured():
    """`measured(name, value, bound, kind)`: keep a measurement for the report; returns the value."""

    def record(name: str, value: float, bound: float | None, kind: str = "<=") -> float:
        # strict JSON has no inf (identical images have infinite PSNR): written as the string "inf"
        _measured.append({"check": name, "value": float(value) if math.isfinite(value) else str(float(value)),
                          "bound": bound, "kind": kind})
        return value

    yield record
    target = os.environ.get("MSD_LORA_PARITY_REPORT")
    if target and _measured:
        import mindspore
        import torch

        report = {"machine": platform.machine(), "torch": torch.__version__, "mindspore": mindspore.__version__,
                  "mindspore_device": mindspore.get_context("device_target"), "checks": _measured}
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
