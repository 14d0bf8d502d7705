#!/usr/bin/env python
"""Train a Stable Diffusion LoRA: python train_text_to_image.py --train_config configs/train/lora_tiny.yaml"""
from msd_lora.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
