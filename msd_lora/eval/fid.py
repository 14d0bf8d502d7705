"""FID from image folders: read -> preprocess (msd_lora.eval.preprocess) -> InceptionV3 pool3 -> statistics ->
Fréchet distance. Backend-neutral: the network is any callable from network input to features."""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from msd_lora.errors import ConfigError, ImageInputError, StatisticsError, WeightsError
from msd_lora.eval.frechet import Gaussian, feature_statistics
from msd_lora.eval.images import ConversionLog, ImageSet, read_rgb_batch
from msd_lora.eval.inception_arch import POOL3_FEATURES
from msd_lora.eval.preprocess import inception_input

Network = Callable[[np.ndarray], np.ndarray]


@dataclass
class SetFeatures:
    features: np.ndarray  # (N, 2048) float64
    notes: list[str] = field(default_factory=list)  # conversions and skipped files, for the report

    def statistics(self, what: str) -> Gaussian:
        return feature_statistics(self.features, what)


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def extract_features(images: ImageSet, network: Network, resize: str, batch_size: int = 32,
                     progress: bool = True) -> SetFeatures:
    """pool3 features of every image of `images`, preprocessed by the `resize` protocol."""
    from tqdm.auto import tqdm

    log, chunks = ConversionLog(), []
    with tqdm(total=len(images), desc=f"inception {images.root.name}", disable=not progress, file=sys.stderr) as bar:
        for chunk in batches(images.files, batch_size):
            pixels = read_rgb_batch(chunk, log)
            chunks.append(np.asarray(network(inception_input(pixels, resize)), np.float64))
            bar.update(len(chunk))
    features = np.concatenate(chunks)
    if features.shape[1:] != (POOL3_FEATURES,):
        raise WeightsError(f"the feature network returned {features.shape[1:]}, expected ({POOL3_FEATURES},)")
    if not np.isfinite(features).all():
        raise WeightsError(f"{images.root}: the Inception features are not finite; check the weights file")
    notes = [n for n in (images.describe_skipped(), log.summary(images.root)) if n]
    return SetFeatures(features, notes)


def small_set_note(n: int, what: str) -> str | None:
    """FID is biased upwards for small sets; below 2048 images the covariance is rank-deficient as well."""
    if n >= POOL3_FEATURES:
        return None
    return (f"{what}: {n} images; with fewer than {POOL3_FEATURES} the covariance is rank-deficient and FID is "
            f"biased upwards (published FIDs use 10k-50k images): compare only FIDs from equal image counts")


def fid_image_set(folder, what: str) -> ImageSet:
    """The images of an FID input folder (a text_to_image.py output folder means its samples/); at least 2."""
    from msd_lora.eval.images import find_images, sample_folder

    images = find_images(sample_folder(folder), what)
    if len(images) < 2:
        raise ImageInputError(f"{what} {images.root}: FID needs at least 2 images (the covariance of 1 image is "
                              f"undefined); found {len(images)}")
    return images


def unrecorded_note(info: dict[str, str], source: str, resize: str) -> str | None:
    """A note for saved statistics that do not record their preprocessing or weights, e.g. every .npz pytorch-fid
    writes (those are --resize bilinear with the standard weights)."""
    missing = [what for key, what in (("resize", "preprocessing (--resize)"), ("weights_sha256", "Inception weights"))
               if key not in info]
    if not missing:
        return None
    note = f"{source} does not record its {' or '.join(missing)}, so this run cannot check them"
    if "resize" in info:
        return note
    return (note + " (pytorch-fid's own .npz files are --resize bilinear with its standard weights): compare only "
                   "with --resize bilinear" + (f", not this run's --resize {resize}" if resize != "bilinear" else ""))


class FidEvaluator:
    """FID of image folders against a real set, with one loaded InceptionV3 (reused across folders)."""

    def __init__(self, backend: str = "torch", weights: str | None = None, resize: str = "bilinear",
                 batch_size: int = 32, device: str = "auto", ms_mode: int = 0, progress: bool = True):
        from msd_lora.eval.networks import backend_name, inception_features
        from msd_lora.eval.preprocess import get_protocol
        from msd_lora.eval.report import loud_random_warning, nonstandard_weights_note
        from msd_lora.eval.weights import describe_weights, read_inception_weights, resolve_inception_weights

        if batch_size < 1:
            raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
        self.backend, self.resize, self.protocol = backend_name(backend), resize, get_protocol(resize)
        self.batch_size, self.progress = batch_size, progress
        path = resolve_inception_weights(weights)
        state, metadata = read_inception_weights(path)
        self.weights = describe_weights(path, metadata)
        self.notes = []
        if self.weights["random_init"]:
            self.notes.append(loud_random_warning("The FID InceptionV3", str(path)))
        elif not self.weights["standard"]:
            self.notes.append(nonstandard_weights_note(str(path), self.weights["sha256"]))
        self.network = inception_features(self.backend, state, str(path), device, ms_mode)

    def folder_features(self, folder, what: str) -> SetFeatures:
        images = fid_image_set(folder, what)
        found = extract_features(images, self.network, self.resize, self.batch_size, self.progress)
        found.notes += [n for n in (small_set_note(len(images), f"{what} {images.root}"),) if n]
        return found

    def real_statistics(self, real_dir=None, real_stats=None, save_stats=None) -> tuple[Gaussian, list[str]]:
        """The real set's statistics, from images (optionally saved to `save_stats`) or a saved .npz; and notes."""
        from msd_lora.eval.frechet import load_statistics, save_statistics

        if real_stats:
            gaussian, info = load_statistics(real_stats)
            return gaussian, [f"real statistics from {real_stats}", *self.check_compatible(info, str(real_stats))]
        if not real_dir:
            raise ConfigError("give --real_dir DIR or --real_stats FILE.npz")
        found = self.folder_features(real_dir, "--real_dir")
        gaussian = found.statistics(f"--real_dir {real_dir}")
        if save_stats:
            save_statistics(save_stats, gaussian, resize=self.resize, weights_sha256=self.weights["sha256"])
        return gaussian, found.notes

    def check_compatible(self, info: dict[str, str], source: str) -> list[str]:
        """Saved statistics must come from the same preprocessing and weights; a file that does not say which
        (pytorch-fid's own .npz) is accepted with a note."""
        if "resize" in info and info["resize"] != self.resize:
            raise StatisticsError(f"{source} was computed with --resize {info['resize']}, this run uses {self.resize}: "
                                  f"FIDs across preprocessing protocols are not comparable")
        if "weights_sha256" in info and info["weights_sha256"] != self.weights["sha256"]:
            raise StatisticsError(f"{source} was computed with other Inception weights (sha256 {info['weights_sha256']}) "
                                  f"than {self.weights['file']} (sha256 {self.weights['sha256']}; a converted .safetensors "
                                  f"copy counts as the .pth it was made from)")
        return [n for n in (unrecorded_note(info, source, self.resize),) if n]

    def fid(self, real: tuple[Gaussian, list[str]], gen_dir) -> dict:
        """FID of the images under `gen_dir` against `real` (from real_statistics), with a record of how."""
        from msd_lora.eval.frechet import gaussian_distance

        gaussian, real_notes = real
        found = self.folder_features(gen_dir, "--gen_dir")
        generated = found.statistics(f"--gen_dir {gen_dir}")
        num_real = gaussian.num_images if gaussian.num_images >= 0 else None  # None: the .npz does not say
        return {"fid": gaussian_distance(gaussian, generated), "num_real": num_real,
                "num_gen": generated.num_images, "resize": self.resize, "protocol": self.protocol.reproduces,
                "backend": self.backend, "weights": self.weights, "notes": self.notes + real_notes + found.notes}
