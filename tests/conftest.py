"""Shared test fixtures: the embedded tiny model and LoRA dataset, and tiny-run configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = Path(os.environ.get("MSD_LORA_TEST_MODEL", REPO / "msd_lora/assets/tiny_sd"))
TINY_DATA = Path(os.environ.get("MSD_LORA_TEST_DATA", REPO / "msd_lora/assets/tiny_lora_data"))
TINY_TRAIN_CONFIG = REPO / "configs/train/lora_tiny.yaml"


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
