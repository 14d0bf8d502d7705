"""CLIP score of an image folder against its prompts: pair (msd_lora.eval.clip_score), preprocess with the model's
CLIPImageProcessor and CLIPTokenizer (numpy), embed on a backend, score per pair, average."""
from __future__ import annotations

import sys

import numpy as np

from msd_lora.errors import ConfigError
from msd_lora.eval.clip_model import DEFAULT_CLIP_MODEL
from msd_lora.eval.clip_score import check_against_index, clip_scores, prompts_from_index, prompts_per_image
from msd_lora.eval.fid import batches
from msd_lora.eval.images import ConversionLog, find_images, read_rgb_batch, sample_folder


def text_length(tokenizer, config: dict) -> int:
    """Tokens per prompt: the tokenizer's model_max_length, capped at the text tower's position embeddings (a
    tokenizer_config.json without model_max_length leaves transformers' 1e30)."""
    positions = int((config.get("text_config") or {}).get("max_position_embeddings", 77))  # CLIPTextConfig's default
    return min(int(tokenizer.model_max_length), positions)


class ClipScorer:
    """CLIP score with one loaded CLIP model (reused across folders)."""

    def __init__(self, backend: str = "torch", ckpt_path: str | None = None,
                 model_name: str = DEFAULT_CLIP_MODEL, batch_size: int = 16, device: str = "auto",
                 ms_mode: int = 0, progress: bool = True):
        from msd_lora.eval.clip_model import load_clip_files, resolve_clip_folder
        from msd_lora.eval.networks import backend_name, clip_embedder
        from msd_lora.eval.report import loud_random_warning

        if batch_size < 1:
            raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
        self.backend, self.batch_size, self.progress = backend_name(backend), batch_size, progress
        files = load_clip_files(resolve_clip_folder(ckpt_path, model_name))
        self.model = {"folder": str(files.folder), "random_init": files.random_init}
        self.notes = [loud_random_warning("The CLIP model", str(files.folder))] if files.random_init else []
        self.tokenizer, self.processor = files.tokenizer(), files.image_processor()
        self.max_length = text_length(self.tokenizer, files.config)
        self.embedder = clip_embedder(self.backend, files.config, files.state, str(files.folder), device, ms_mode)

    def text_embeddings(self, prompts: list[str]) -> tuple[np.ndarray, int]:
        """Embeddings of `prompts` and how many were cut at the text length (77 for CLIP)."""
        length = self.max_length
        full = self.tokenizer(prompts, truncation=False).input_ids
        tokens = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np")
        embeds = [self.embedder.text_embeddings(tokens.input_ids[i:i + self.batch_size],
                                                tokens.attention_mask[i:i + self.batch_size])
                  for i in range(0, len(prompts), self.batch_size)]
        return np.concatenate(embeds), sum(len(ids) > length for ids in full)

    def pixel_values(self, images: list[np.ndarray]) -> np.ndarray:
        return self.processor(images=images, return_tensors="np", input_data_format="channels_last")["pixel_values"]

    def score(self, image_path_or_dir, prompts: list[str], images_per_prompt: int | None = None) -> dict:
        """{'clip_score', 'num_images', 'records' (one per image), 'notes'}."""
        from tqdm.auto import tqdm

        images = find_images(sample_folder(image_path_or_dir), "--image_path_or_dir")
        image_prompts = prompts_per_image(len(images), prompts, images_per_prompt)
        per_prompt = len(images) // len(prompts)
        notes = self.notes + ([images.describe_skipped()] if images.skipped else [])
        index = images.root.parent / "samples.jsonl"
        if images.root.name == "samples" and index.is_file():
            check_against_index(image_prompts, prompts_from_index(index, images.files), index)
            notes.append(f"pairing checked against {index}")
        unique = list(dict.fromkeys(prompts))
        text, truncated = self.text_embeddings(unique)
        if truncated:
            notes.append(f"{truncated} prompt(s) longer than {self.max_length} tokens were truncated")
        row = {p: i for i, p in enumerate(unique)}
        log, records, scores = ConversionLog(), [], []
        with tqdm(total=len(images), desc="clip", disable=not self.progress, file=sys.stderr) as bar:
            for chunk in batches(list(range(len(images))), self.batch_size):
                pixels = read_rgb_batch([images.files[i] for i in chunk], log)
                embeds = self.embedder.image_embeddings(self.pixel_values(pixels))
                chunk_scores = clip_scores(embeds, text[[row[image_prompts[i]] for i in chunk]])
                for i, value in zip(chunk, chunk_scores):
                    records.append({"file": str(images.files[i]), "prompt": image_prompts[i],
                                    "prompt_index": i // per_prompt, "clip_score": float(value)})
                scores.extend(chunk_scores)
                bar.update(len(chunk))
        notes += [n for n in (log.summary(images.root),) if n]
        return {"clip_score": float(np.mean(scores)), "num_images": len(images), "num_prompts": len(prompts),
                "backend": self.backend, "model": self.model, "records": records, "notes": notes}
