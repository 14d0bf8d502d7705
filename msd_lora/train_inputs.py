"""What each micro-step trains on: the data's batch, its latents and text states (from the caches or the frozen
networks) and the step's noise, assembled into a `StepBatch`. `RunData` is a run's dataset side, built from the
config; `TrainingInputs` turns it into step batches once the backend holds the networks.

The image and caption side (`data.loader`) is prepared ahead on worker threads; the networks run here, on the
caller's thread. Cached and uncached runs compute the same numbers: a cache stores the VAE posterior's mean and
standard deviation (not one sample of it) and the text encoder's output, and the step draws the posterior noise
exactly as without a cache.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.backends.base import Backend, ModelInfo, StepBatch
from msd_lora.config import TrainConfig
from msd_lora.data.batching import BatchOrder
from msd_lora.data.buckets import BucketSettings
from msd_lora.data.cache import FeatureCache, weights_identity
from msd_lora.data.captions import CaptionOptions
from msd_lora.data.class_images import check_generation_record, generation_record
from msd_lora.data.dataset import CaptionedImageDataset
from msd_lora.data.loader import BatchMaker, HostBatch, Prefetcher
from msd_lora.data.transforms import crop_box
from msd_lora.diffusion.losses import LossOptions
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.embeddings.tokens import TEMPLATES
from msd_lora.files.atomic import atomic_write_text
from msd_lora.files.plain import sha256_of
from msd_lora.held_out import HeldOut, split_items
from msd_lora.lora.dropout import step_seed
from msd_lora.models.pretrained import PretrainedModel
from msd_lora.tokenizer import TOKEN_LENGTHS, PromptTokenizer, cache_root

NOISE_STREAM = 0x5EED  # keeps the noise stream apart from the data-order stream [seed, epoch]
PRIOR_SEED_OFFSET = 0x0C1A55  # the class images' order, crops and noise: a seed of their own


@dataclass(frozen=True)
class CacheSettings:
    latents: bool = False
    text: bool = False
    folder: str | None = None  # None: in memory
    vae_identity: str = ""
    text_encoder_identity: str = ""


@dataclass
class RunData:
    """A run's dataset, batch order, caption options, tokenizer and cache settings, from its config."""

    dataset: CaptionedImageDataset
    order: BatchOrder
    captions: CaptionOptions
    tokenizer: PromptTokenizer
    caches: CacheSettings
    buckets: BucketSettings | None
    seed: int
    workers: int
    held_out: HeldOut | None = None  # images for the validation loss
    prior: PriorData | None = None  # DreamBooth's class images, trained beside the instance images

    @classmethod
    def from_config(cls, cfg: TrainConfig, pretrained: PretrainedModel) -> RunData:
        """Reads the dataset (checked, bucketed) and, for the caches, the identities of the frozen networks' weights
        (before a backend takes them)."""
        buckets = bucket_settings(cfg, pretrained.configs)
        subject = " ".join(cfg.placeholder_tokens)
        instance_prompt = cfg.instance_prompt or (subject if cfg.use_template else "")
        dataset = CaptionedImageDataset(
            cfg.data_path, cfg.image_size, random_crop=cfg.random_crop, flip=cfg.flip, caption_column=cfg.caption_column,
            dataset_type=cfg.dataset_type, caption_extension=cfg.caption_extension, instance_prompt=instance_prompt,
            buckets=buckets, min_image_size=cfg.min_image_size)
        captions = CaptionOptions(dropout_rate=cfg.caption_dropout_rate, shuffle=cfg.shuffle_caption,
                                  keep_tokens=cfg.keep_tokens, separator=cfg.caption_separator,
                                  prefix=cfg.caption_prefix, suffix=cfg.caption_suffix,
                                  templates=TEMPLATES[cfg.use_template] if cfg.use_template else (), subject=subject)
        folder = (cfg.cache_dir or str(cache_root() / "features")) if cfg.cache_to_disk else None
        caches = CacheSettings(
            latents=cfg.cache_latents, text=cfg.cache_text_embeddings, folder=folder,
            vae_identity=weights_identity(pretrained.state["vae"]) if cfg.cache_latents else "",
            text_encoder_identity=weights_identity(pretrained.state["text_encoder"]) if cfg.cache_text_embeddings
            else "")
        training, held = split_items(len(dataset), cfg.validation_split, cfg.seed)
        held_out = HeldOut(dataset, held, cfg.train_batch_size, captions, cfg.seed) if held else None
        if cfg.validation_data_path:
            other = CaptionedImageDataset(
                cfg.validation_data_path, cfg.image_size, caption_column=cfg.caption_column,
                caption_extension=cfg.caption_extension, instance_prompt=cfg.instance_prompt, buckets=buckets,
                min_image_size=cfg.min_image_size)
            held_out = HeldOut(other, list(range(len(other))), cfg.train_batch_size, captions, cfg.seed)
        order = BatchOrder(dataset.groups(set(training)), cfg.train_batch_size, cfg.seed)
        prior = PriorData.from_config(cfg) if cfg.with_prior_preservation else None
        return cls(dataset, order, captions, PromptTokenizer(pretrained.tokenizer_dir, cfg.max_token_length), caches,
                   buckets, cfg.seed, cfg.dataloader_num_workers, held_out, prior)

    def inputs(self, backend: Backend, info: ModelInfo, schedule: NoiseSchedule, loss: LossOptions = LossOptions(),
               dropout: bool = False) -> TrainingInputs | PairedInputs:
        instance = TrainingInputs(self.dataset, self.order, self.captions, self.tokenizer, backend, info, schedule,
                                  self.seed, self.workers, self.caches, loss, dropout)
        if self.prior is None:
            return instance
        prior = self.prior
        classes = TrainingInputs(prior.dataset, prior.order, CaptionOptions(), self.tokenizer, backend, info, schedule,
                                 prior.order.seed, self.workers, self.caches, loss)
        return PairedInputs(instance, classes, prior.weight)

    def truncation_notes(self) -> list[str]:
        """A warning when captions are longer than max_token_length (they are truncated)."""
        fixed = sorted({self.captions.fixed(c) for c in self.dataset.captions})
        overlong = self.tokenizer.overlong(fixed)
        if not overlong:
            return []
        limit = self.tokenizer.max_token_length
        longest = max(n for _, n in overlong)
        hint = f"; max_token_length {TOKEN_LENGTHS[-1]} keeps up to {TOKEN_LENGTHS[-1]}" if limit < TOKEN_LENGTHS[-1] \
            else ""
        return [f"warning: {len(overlong)} of {len(fixed)} captions are longer than max_token_length {limit} tokens "
                f"(the longest has {longest}) and are truncated, e.g. '{overlong[0][0][:60]}...'{hint}"]

    def summary(self) -> str:
        """The dataset, its epoch and its buckets, as printed at the start of a run."""
        listing, counts = self.dataset.listing, self.dataset.bucket_counts()
        lines = [f"dataset: {listing.kind} ({listing.listed_in}), {len(self.dataset)} images, "
                 f"{self.order.num_items} per epoch with repeats, {self.order.steps_per_epoch} batches of "
                 f"{self.order.batch_size} per epoch"]
        if self.prior is not None:
            classes = self.prior.dataset
            lines.append(f"prior preservation: {len(classes)} class images ({classes.listing.kind}, "
                         f"{classes.listing.listed_in}), {self.order.batch_size} beside each batch, loss weight "
                         f"{self.prior.weight:g}")
        if self.held_out is not None:
            where = "of them held out" if self.held_out.dataset is self.dataset else \
                f"from {self.held_out.dataset.data_path}"
            lines.append(f"validation loss: {len(self.held_out.items)} images {where}, at timesteps "
                         f"10/350/500/650/990 of 1000")
        if self.buckets is not None or len(counts) > 1:
            lines.append("buckets (width x height: images, with repeats): " + ", ".join(
                f"{w}x{h}: {n} ({r})" for (w, h), (n, r) in counts.items()))
        return "\n".join(lines)

    def write_bucket_table(self, path: Path) -> Path:
        """The buckets with their image counts, as JSON."""
        table = {"enable_bucket": self.buckets is not None, "steps_per_epoch": self.order.steps_per_epoch,
                 "buckets": [{"width": w, "height": h, "images": n, "with_repeats": r}
                             for (w, h), (n, r) in self.dataset.bucket_counts().items()]}
        atomic_write_text(path, json.dumps(table, indent=2) + "\n")
        return path


@dataclass(frozen=True)
class PriorData:
    """DreamBooth's class images (prior preservation) and their own batch order."""

    dataset: CaptionedImageDataset
    order: BatchOrder
    weight: float  # prior_loss_weight

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> PriorData:
        check_generation_record(Path(cfg.class_data_dir), generation_record(cfg))
        dataset = CaptionedImageDataset(cfg.class_data_dir, cfg.image_size, random_crop=cfg.random_crop, flip=cfg.flip,
                                        caption_column=cfg.caption_column, caption_extension=cfg.caption_extension,
                                        instance_prompt=cfg.class_prompt, min_image_size=cfg.min_image_size)
        return cls(dataset, BatchOrder(dataset.groups(), cfg.train_batch_size, cfg.seed + PRIOR_SEED_OFFSET),
                   cfg.prior_loss_weight)


class PairedInputs:
    """DreamBooth with prior preservation: each step's batch is the instance batch followed by as many class images
    (their own order, crops and noise), with per-sample loss weights 2 and 2 x prior_loss_weight, so the mean over
    the batch is  mean(instance losses) + prior_loss_weight x mean(class losses)  (diffusers' and mindone's loss)."""

    def __init__(self, instance: TrainingInputs, classes: TrainingInputs, weight: float):
        self.instance, self.classes, self.weight = instance, classes, weight
        self.caches = instance.caches

    def __call__(self, micro_step: int) -> StepBatch:
        a, b = self.instance(micro_step), self.classes(micro_step)
        weights = np.concatenate([_weights(a) * 2.0, _weights(b) * (2.0 * self.weight)]).astype(np.float32)
        joined = {f.name: _joined(getattr(a, f.name), getattr(b, f.name))
                  for f in dataclasses.fields(StepBatch) if f.name not in ("loss_weights", "dropout_seed")}
        return StepBatch(**joined, loss_weights=weights, dropout_seed=a.dropout_seed)

    def split_losses(self, sample_losses: np.ndarray) -> tuple[float, float]:
        """(instance loss, class loss) of a step's per-sample weighted losses: each its half's mean, unweighted."""
        n = len(sample_losses) // 2
        return float(sample_losses[:n].mean() / 2.0), float(sample_losses[n:].mean() / (2.0 * self.weight))

    def fill_caches(self, progress) -> dict[str, tuple[int, int]]:
        report = self.instance.fill_caches(progress)
        for cache, (reused, computed) in self.classes.fill_caches(progress).items():
            report[f"class {cache}"] = (reused, computed)
        return report

    def close(self) -> None:
        self.instance.close()
        self.classes.close()


def _weights(batch: StepBatch) -> np.ndarray:
    return np.ones(len(batch.timesteps), np.float32) if batch.loss_weights is None else batch.loss_weights


def _joined(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Two batches' values of one StepBatch field, instance rows first; None where both halves leave it out (both
    come from the same loss options, so an optional field is set on both or on neither)."""
    return None if a is None and b is None else np.concatenate([a, b])


def bucket_settings(cfg: TrainConfig, configs: dict[str, dict]) -> BucketSettings | None:
    """The config's bucket settings, checked against what the model divides a side by; None without buckets."""
    if not cfg.enable_bucket:
        return None
    settings = BucketSettings(cfg.image_size, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps,
                              cfg.bucket_no_upscale)
    vae_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    settings.check(vae_factor * 2 ** (len(configs["unet"]["block_out_channels"]) - 1))
    return settings


class TrainingInputs:
    """`inputs(micro_step) -> StepBatch`, a pure function of the seed and the step."""

    def __init__(self, dataset: CaptionedImageDataset, order: BatchOrder, captions: CaptionOptions,
                 tokenizer: PromptTokenizer, backend: Backend, info: ModelInfo, schedule: NoiseSchedule, seed: int,
                 workers: int = 0, caches: CacheSettings = CacheSettings(), loss: LossOptions = LossOptions(),
                 dropout: bool = False):
        self.dataset, self.order, self.captions, self.tokenizer = dataset, order, captions, tokenizer
        self.backend, self.info, self.schedule, self.seed = backend, info, schedule, seed
        self.caches, self.loss, self.dropout = caches, loss, dropout
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
        latents = (mean + std * posterior_noise) * np.float32(self.info.scaling_factor) if self.loss.needs_latents \
            else None
        noise = self.loss.noise(noise, latents, rng)  # the draws of the loss options come after the ones above
        input_noise = self.loss.input_noise(noise, rng)
        sqrt_alpha, sqrt_one_minus = self.schedule.coefficients(timesteps)
        token_ids = self.tokenizer(host.captions)
        text = {"token_ids": token_ids} if self.backend.trains_text_encoder else {"context": self._context(token_ids)}
        return StepBatch(latent_mean=mean, latent_std=std, posterior_noise=posterior_noise, noise=noise,
                         timesteps=timesteps, sqrt_alpha=sqrt_alpha, sqrt_one_minus_alpha=sqrt_one_minus,
                         input_noise=input_noise, loss_weights=self.loss.weights(self.schedule, timesteps),
                         huber_c=self.loss.thresholds(self.schedule, timesteps),
                         dropout_seed=step_seed(self.seed, micro_step) if self.dropout else 0, **text)

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
        self._image_hashes = [sha256_of(record.path) for record in self.dataset.records]
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
