"""The MindSpore process setup every MindSpore network here needs, whatever it is for (training, FID, CLIP score):
the execution mode and device target, the CPU kernel substitutes, and a quiet import of mindone's networks (INFNAN
overflow mode is set by the package's __init__, before MindSpore is imported)."""
from __future__ import annotations

import contextlib
import io
import warnings

import mindspore as ms

from msd_lora.backends.mindspore.kernels import apply_cpu_kernel_substitutes
from msd_lora.errors import ConfigError

DEVICE_TARGETS = {"cpu": "CPU", "gpu": "GPU", "cuda": "GPU", "ascend": "Ascend"}


def configure_context(mode: int, device: str) -> str:
    """Set the execution mode and device target once per process; substitute missing CPU kernels."""
    if device != "auto":
        if device.lower() not in DEVICE_TARGETS:
            raise ConfigError(f"device '{device}' is not a MindSpore target; use auto, cpu, gpu or ascend")
        target = DEVICE_TARGETS[device.lower()]
        if target != ms.get_context("device_target"):  # MindSpore takes the device once, before it first runs
            ms.set_device(target)
    ms.set_context(mode=ms.GRAPH_MODE if mode == 0 else ms.PYNATIVE_MODE)
    apply_cpu_kernel_substitutes()
    return ms.get_context("device_target")


def import_mindone_quietly() -> None:
    """Import mindone without the noise it makes with these versions, which says nothing about this run:
    transformers 4.57 prints "Config not found" for each mindone model it lacks (parakeet, ...), mindone still
    imports `mindspore.common.api` (deprecated in 2.9) and calls a deprecated transformers argument."""
    from mindspore import log as ms_log

    deprecation = lambda record: "is deprecated from version" not in record.getMessage()  # noqa: E731
    ms_log._get_logger().addFilter(deprecation)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # mindone loads its modules lazily: import the classes, so that their import happens here
            from mindone.diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
            from mindone.transformers import CLIPTextModel  # noqa: F401
    finally:
        ms_log._get_logger().removeFilter(deprecation)
