"""Shared test fixtures: the embedded tiny model and LoRA dataset, and tiny-run configs.

With MSD_LORA_REQUIRE_ALL=1 (CI sets it) a missing or broken framework, or a missing cross-check environment,
fails the session at once instead of letting the module-level `importorskip`s skip whole test files.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = Path(os.environ.get("MSD_LORA_TEST_MODEL", REPO / "msd_lora/assets/tiny_sd"))
TINY_DATA = Path(os.environ.get("MSD_LORA_TEST_DATA", REPO / "msd_lora/assets/tiny_lora_data"))
TINY_TRAIN_CONFIG = REPO / "configs/train/lora_tiny.yaml"
REQUIRED_MODULES = ("torch", "diffusers", "peft", "transformers", "mindspore", "mindone")
XCHECK_READY = REPO / ".venv-xcheck" / ".installed"  # written by `make xcheck-env` once every package is in


def missing_requirements() -> list[str]:
    """What the full suite needs and this machine lacks: framework imports that fail, the cross-check venv."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except Exception as err:  # a broken install raises more than ImportError
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if not XCHECK_READY.exists():
        missing.append(f"the cross-check environment {XCHECK_READY.parent} (make xcheck-env)")
    return missing


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("MSD_LORA_REQUIRE_ALL", "") not in ("", "0") and (missing := missing_requirements()):
        pytest.exit("MSD_LORA_REQUIRE_ALL=1 and the full suite cannot run: missing " + "; ".join(missing), returncode=3)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return TINY_MODEL


@pytest.fixture(scope="session")
def tiny_data() -> Path:
    return TINY_DATA


def tiny_args(output: Path, *extra: str) -> list[str]:
    """CLI arguments for a short run of the tiny config writing into `output`."""
    return ["--train_config", str(TINY_TRAIN_CONFIG), "--pretrained_model_path", str(TINY_MODEL),
            "--data_path", str(TINY_DATA), "--output_path", str(output), *extra]


def interrupt_on_call(backend, call: int) -> None:
    """Make `backend.train_step` raise KeyboardInterrupt on its `call`-th call (1-based), as a kill there would."""
    real_step, calls = backend.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    backend.train_step = step
