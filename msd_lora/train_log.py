"""What a run reports: a progress bar (loss, lr, skipped steps, it/s, ETA), a CSV log and TensorBoard."""
from __future__ import annotations

import csv
import time
from pathlib import Path

from msd_lora.output_folder import open_for_writing

COLUMNS = ["step", "epoch", "loss", "lr", "grad_norm", "loss_scale", "overflow", "skipped_steps", "elapsed_s",
           "lr_text_encoder", "val_loss", "loss_instance", "loss_prior", "lr_embeddings"]


class TrainLog:
    def __init__(self, output: Path, total_steps: int, start_step: int, show_progress: bool = True):
        from tqdm.auto import tqdm

        self.csv_path = output / "train_log.csv"
        fresh = start_step == 0 or not self.csv_path.exists()
        if not fresh:
            self._truncate_after(start_step)
        self.file = open_for_writing(self.csv_path, append=not fresh)
        self.writer = csv.DictWriter(self.file, COLUMNS)
        if fresh:
            self.writer.writeheader()
        self.tensorboard = _tensorboard_writer(output / "tensorboard")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not show_progress,
                        dynamic_ncols=True)
        self.start = time.time()

    def _truncate_after(self, step: int) -> None:
        """Drop rows past the resumed step: they belong to the work the resume discards."""
        with open(self.csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open_for_writing(self.csv_path) as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def step(self, row: dict, write: bool) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", skipped=row["skipped_steps"],
                             refresh=False)
        if not write:
            return
        row = {**row, "elapsed_s": round(time.time() - self.start, 2)}
        self.writer.writerow(row)
        self.file.flush()
        if self.tensorboard is not None:
            for key in ("loss", "lr", "lr_text_encoder", "loss_scale", "skipped_steps", "loss_instance", "loss_prior",
                        "lr_embeddings"):
                if row.get(key) is not None:
                    self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            if row.get("val_loss") is not None:
                self.tensorboard.add_scalar("validation/loss", row["val_loss"], row["step"])

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _tensorboard_writer(folder: Path):
    """A SummaryWriter when tensorboard is installed, else None (the CSV log is always written)."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))
