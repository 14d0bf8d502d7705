"""What each micro-step trains on: the data's batch, its latents and text states (from the caches or the frozen
networks) and the step's noise, assembled into a `StepBatch`.

The image and caption side (`data.loader`) is prepared ahead on worker threads; the networks run here, on the
caller's thread. Cached and uncached runs compute the same numbers: a cache stores the VAE posterior's mean and
standard deviation (not one sample of it) and the text encoder's output, and the step draws the posterior noise
exactly as without a cache.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from msd_lora.backends.base import Backend, ModelInfo, StepBatch
from msd_lora.data.batching import BatchOrder
from msd_lora.data.cache import FeatureCache, file_digest
from msd_lora.data.captions import CaptionOptions
from msd_lora.data.dataset import CaptionedImageDataset
from msd_lora.data.loader import BatchMaker, HostBatch, Prefetcher
from msd_lora.data.transforms import crop_box
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.tokenizer import PromptTokenizer

NOISE_STREAM = 0x5EED  # keeps the noise stream apart from the data-order stream [seed, epoch]


@dataclass(frozen=True)
class CacheSettings:
    latents: bool = False
    text: bool = False
    folder: str | None = None  # None: in memory
    vae_identity: str = ""
    text_encoder_identity: str = ""


class TrainingInputs:
    """`inputs(micro_step) -> StepBatch`, a pure function of the seed and the step."""

    def __init__(self, dataset: CaptionedImageDataset, order: BatchOrder, captions: CaptionOptions,
                 tokenizer: PromptTokenizer, backend: Backend, info: ModelInfo, schedule: NoiseSchedule, seed: int,
                 workers: int = 0, caches: CacheSettings = CacheSettings()):
        self.dataset, self.order, self.captions, self.tokenizer = dataset, order, captions, tokenizer
        self.backend, self.info, self.schedule, self.seed = backend, info, schedule, seed
        self.caches = caches
        self.latents = FeatureCache("latents", caches.folder) if caches.latents else None
        self.texts = FeatureCache("text", caches.folder) if caches.text else None
        self.batches = Prefetcher(BatchMaker(dataset, order, captions, seed, with_pixels=self.latents is None),
                                  workers)
        self._image_hashes: list[str] = []
        self._filled = False

    def close(self) -> None:
        self.batches.close()

    # --- the step's batch ---------------------------------------------------------------------------------------
    def __call__(self, micro_step: int) -> StepBatch:
        if not self._filled:
            self.fill_caches(lambda what, total: lambda n: None)
        host = self.batches.get(micro_step)
        mean, std = self._moments(host)
        rng = np.random.default_rng([self.seed, NOISE_STREAM, micro_step])
        shape = self.info.latent_shape(len(host.items), host.bucket[1], host.bucket[0])
        timesteps = rng.integers(0, self.schedule.num_train_timesteps, shape[0]).astype(np.int64)
        noise = rng.standard_normal(shape, dtype=np.float32)
        posterior_noise = rng.standard_normal(shape, dtype=np.float32)
        sqrt_alpha, sqrt_one_minus = self.schedule.coefficients(timesteps)
        token_ids = self.tokenizer(host.captions)
        text = {"token_ids": token_ids} if self.backend.trains_text_encoder else {"context": self._context(token_ids)}
        return StepBatch(latent_mean=mean, latent_std=std, posterior_noise=posterior_noise, noise=noise,
                         timesteps=timesteps, sqrt_alpha=sqrt_alpha, sqrt_one_minus_alpha=sqrt_one_minus, **text)

    def _moments(self, host: HostBatch) -> tuple[np.ndarray, np.ndarray]:
        if self.latents is None:
            return self.backend.encode_moments(host.pixels)
        entries = []
        for item, (box, mirrored) in zip(host.items, host.crops):
            entry = self.latents.get(self._latent_key(int(item), box, mirrored))
            if entry is None:  # filled before training; gone only if someone deleted the file meanwhile
                pixels = self.dataset.pixels(int(item), box, mirrored)[None]
                mean, std = self.backend.encode_moments(pixels)
                entry = {"mean": mean[0], "std": std[0]}
            entries.append(entry)
        return np.stack([e["mean"] for e in entries]), np.stack([e["std"] for e in entries])

    def _context(self, token_ids: np.ndarray) -> np.ndarray:
        if self.texts is None:
            return self.backend.encode_text(token_ids)
        rows = []
        for ids in token_ids:
            entry = self.texts.get(self._text_key(ids))
            rows.append(entry["states"] if entry is not None else self.backend.encode_text(ids[None])[0])
        return np.stack(rows)

    # --- cache keys and filling ---------------------------------------------------------------------------------
    def _latent_key(self, item: int, box: tuple[int, int, int, int], mirrored: bool) -> dict:
        return {"vae": self.caches.vae_identity, "image": self._image_hashes[item],
                "resize": list(self.dataset.placements[item].resize), "box": list(box), "mirrored": bool(mirrored)}

    def _text_key(self, ids: np.ndarray) -> dict:
        return {"text_encoder": self.caches.text_encoder_identity, "ids": [int(i) for i in ids]}

    def fill_caches(self, progress: Callable[[str, int], Callable[[int], None]]) -> dict[str, tuple[int, int]]:
        """Compute every missing cache entry; `progress(what, total)` returns a callback advanced per entry.
        Returns {cache: (entries reused, entries computed)}."""
        report, self._filled = {}, True
        if self.latents is not None:
            report["latents"] = self._fill_latents(progress)
        if self.texts is not None:
            report["text"] = self._fill_texts(progress)
        return report

    def _fill_latents(self, progress) -> tuple[int, int]:
        self._image_hashes = [file_digest(record.path) for record in self.dataset.records]
        mirrors = (False, True) if self.dataset.flip else (False,)
        missing: dict[tuple[int, int], list[tuple[int, tuple, bool]]] = {}
        total = 0
        for item, placement in enumerate(self.dataset.placements):
            box = crop_box(placement.resize, placement.bucket)  # latent caching trains on centre crops
            for mirrored in mirrors:
                total += 1
                if self._latent_key(item, box, mirrored) not in self.latents:
                    missing.setdefault(placement.bucket, []).append((item, box, mirrored))
        todo = [entry for bucket in sorted(missing) for entry in missing[bucket]]
        advance = progress("caching latents", len(todo))
        for bucket in sorted(missing):
            for chunk in _chunks(missing[bucket], self.order.batch_size):
                pixels = np.stack([self.dataset.pixels(i, box, m) for i, box, m in chunk])
                mean, std = self.backend.encode_moments(_padded(pixels, self.order.batch_size))
                for row, (item, box, mirrored) in enumerate(chunk):
                    self.latents.put(self._latent_key(item, box, mirrored), {"mean": mean[row], "std": std[row]})
                    advance(1)
        return total - len(todo), len(todo)

    def _fill_texts(self, progress) -> tuple[int, int]:
        captions = sorted({self.captions.fixed(c) for c in self.dataset.captions}
                          | ({""} if self.captions.dropout_rate > 0 else set()))
        ids = self.tokenizer(captions)
        todo = [row for row in ids if self._text_key(row) not in self.texts]
        advance = progress("caching text embeddings", len(todo))
        for chunk in _chunks(todo, self.order.batch_size):
            states = self.backend.encode_text(_padded(np.stack(chunk), self.order.batch_size))
            for row, token_ids in enumerate(chunk):
                self.texts.put(self._text_key(token_ids), {"states": states[row]})
                advance(1)
        return len(ids) - len(todo), len(todo)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _padded(batch: np.ndarray, size: int) -> np.ndarray:
    """`batch` filled up to `size` rows by repeating its rows: every encoder call has the training batch's shape, so a
    graph backend compiles no extra shape for the cache."""
    return batch if len(batch) >= size else np.resize(batch, (size, *batch.shape[1:]))
