#!/usr/bin/env python
"""Sample images, optionally with LoRAs: python text_to_image.py --prompt "..." --use_lora True --lora_ckpt_path x"""
from msd_lora.cli.sample import main

if __name__ == "__main__":
    raise SystemExit(main())
