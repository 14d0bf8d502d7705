"""`python train_text_to_image.py --train_config configs/train/lora_tiny.yaml [--key value ...]`."""
from __future__ import annotations

from msd_lora.cli.errors import exits_on_user_error
from msd_lora.config import build_parser, load_train_config


@exits_on_user_error
def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        build_parser().print_help()
        return 0
    cfg = load_train_config(argv)
    from msd_lora.train import train

    result = train(cfg)
    trained = [f"LoRA: {result.lora_path}"] if result.lora_path else []
    trained += [f"embedding: {path}" for path in result.embedding_paths[:1]]  # the A1111 / kohya file
    print(f"{'  '.join(trained)}  ({result.steps} steps, {result.skipped_steps} skipped, "
          f"final loss {result.final_loss:.4f})")
    print(f"log: {result.output_path / 'train_log.csv'}  validation: {result.output_path / 'validation'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
