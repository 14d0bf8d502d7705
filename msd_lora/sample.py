"""Sampling as a library: prompts -> images with classifier-free guidance, one code path for every caller.

    pipeline = load_pipeline("msd_lora/assets/tiny_sd", backend="torch")
    merge_loras(pipeline.backend, read_lora_files([("lora.safetensors", 0.8)], pipeline.module_index))
    images = generate(pipeline, "a red circle on a blue background", 4, SamplingOptions(steps=20))
    write_samples(pipeline, prompts, SamplingOptions(n_iter=2), Path("out"))  # samples/, grid-PPP.png, samples.jsonl

`text_to_image.py`, `tools/eval/run_eval.py` and training's validation samples all call these, with the options
declared once in `SamplingOptions` (the two command lines are generated from it, under mindone's flag names).
Initial latents are drawn in numpy from (seed, prompt index, iteration), so both backends start from the same
noise and a prompt's images don't depend on which other prompts are in the batch file.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from msd_lora.backends.base import Backend, BackendOptions, ModelInfo, get_backend
from msd_lora.diffusion import samplers
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.errors import ConfigError
from msd_lora.files.atomic import atomic_path
from msd_lora.lora.core import LoraWeights
from msd_lora.lora.merge import base_name, check_fits, merged_weights
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.options import setting
from msd_lora.output_folder import open_for_writing
from msd_lora.tokenizer import TOKEN_LENGTHS, PromptTokenizer

SAMPLE_OUTPUTS = ("samples", "samples.jsonl", "grid-*.png")  # what write_samples puts in its folder
NOISE_STREAM = 0x1A7E


@dataclass(frozen=True)
class SamplingOptions:
    """How images are sampled; the command-line flags are mindone's names (--sampling_steps, --scale, --H, --W)."""

    sampler: str = setting("dpm_solver_pp", "sampler", choices=samplers.SAMPLERS)
    steps: int = setting(25, "sampler steps", low=1, high=1000, flag="sampling_steps")
    guidance_scale: float = setting(7.5, "classifier-free guidance scale (1 = off)", low=0.0, high=100.0,
                                    flag="scale")
    negative_prompt: str = setting("", "prompt to steer away from (classifier-free guidance)")
    height: int | None = setting(None, "image height in pixels (default: the model's image_size)", low=8, flag="H")
    width: int | None = setting(None, "image width in pixels (default: the model's image_size)", low=8, flag="W")
    seed: int = setting(42, "seed of the initial noise", low=0)
    n_samples: int = setting(4, "images per batch", low=1, high=256)
    n_iter: int = setting(1, "batches per prompt", low=1)
    max_token_length: int = setting(75, "prompt tokens encoded (75, 150 or 225: 75-token chunks, as in training); a "
                                        "longer prompt is truncated with a warning", choices=TOKEN_LENGTHS)


@dataclass
class Pipeline:
    """A loaded model ready to sample: the backend's networks and the model's tokenizer, schedule and layout."""

    backend: Backend
    info: ModelInfo
    tokenizer: PromptTokenizer
    schedule: NoiseSchedule
    image_size: int  # the model's native resolution: the default height and width
    module_index: ModuleIndex  # the model's layer names, which LoRA files resolve against

    def size(self, options: SamplingOptions) -> tuple[int, int]:
        """(height, width) to sample, checked against the VAE's downscale factor."""
        sides = (options.height or self.image_size, options.width or self.image_size)
        for flag, side in zip(("H", "W"), sides):
            if side % self.info.vae_scale_factor:
                raise ConfigError(f"--{flag} {side} must be a multiple of the VAE's downscale factor "
                                  f"{self.info.vae_scale_factor}")
        return sides

    def check(self, options: SamplingOptions) -> None:
        """Options that depend on the model, checked before any image is made."""
        self.size(options)
        if options.steps > self.schedule.num_train_timesteps:
            raise ConfigError(f"--sampling_steps {options.steps} is more than the model's "
                              f"{self.schedule.num_train_timesteps} training timesteps")


def load_pipeline(model_path: str | Path, model_config: str | Path | None = None, backend: str = "torch",
                  options: BackendOptions = BackendOptions()) -> tuple[Pipeline, list[str]]:
    """(Pipeline, notes about the model) for a base model in any layout msd-lora reads."""
    from msd_lora.models.pretrained import load_model

    pretrained, model_cfg = load_model(model_path, model_config or None)
    notes = [pretrained.metadata["note"]] if pretrained.metadata.get("note") else []
    index = ModuleIndex.for_model(pretrained.configs)
    tokenizer = PromptTokenizer(pretrained.tokenizer_dir)
    runner = get_backend(backend, options)
    info = runner.load_model(pretrained, model_cfg.prediction_type)
    return Pipeline(runner, info, tokenizer, model_cfg.noise_schedule(), model_cfg.image_size, index), notes


def initial_latents(pipeline: Pipeline, options: SamplingOptions, n: int, prompt_index: int,
                    iteration: int) -> np.ndarray:
    height, width = pipeline.size(options)
    factor = pipeline.info.vae_scale_factor
    rng = np.random.default_rng([options.seed, NOISE_STREAM, prompt_index, iteration])
    return rng.standard_normal((n, pipeline.info.latent_channels, height // factor, width // factor)).astype(
        np.float32)


def guided(predictions: list[Any], scale: float) -> Any:
    """Classifier-free guidance: uncond + scale * (cond - uncond); one prediction when guidance is off."""
    if len(predictions) == 1:
        return predictions[0]
    uncond, cond = predictions
    return uncond + scale * (cond - uncond)


def generate(pipeline: Pipeline, prompt: str, n: int, options: SamplingOptions, prompt_index: int = 0,
             iteration: int = 0, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """`n` images (N, H, W, 3) uint8 for one prompt."""
    backend, tokenizer = pipeline.backend, pipeline.tokenizer.with_length(options.max_token_length)
    for text, count in tokenizer.overlong([prompt, options.negative_prompt]):
        warnings.warn(f"prompt of {count} tokens truncated to max_token_length {options.max_token_length}: "
                      f"'{text[:60]}...'" + (" (--max_token_length 150 or 225 keeps more)"
                                             if options.max_token_length < 225 else ""), UserWarning, stacklevel=2)
    cond = backend.encode_prompts(tokenizer([prompt] * n))
    guide = options.guidance_scale != 1.0
    contexts = [backend.encode_prompts(tokenizer([options.negative_prompt] * n)), cond] if guide else [cond]
    sigma = samplers.init_noise_sigma(options.sampler, pipeline.schedule, options.steps)
    latents = backend.tensor(initial_latents(pipeline, options, n, prompt_index, iteration)) * sigma

    def model_fn(x, t):
        return guided(backend.denoise(x, t, contexts), options.guidance_scale)

    latents = samplers.sample(options.sampler, pipeline.schedule, model_fn, latents, options.steps, progress)
    return to_uint8_images(backend.decode(latents))


def write_samples(pipeline: Pipeline, prompts: list[str], options: SamplingOptions, output: Path,
                  loras: list[tuple[str, float]] = (), grid_scale: int = 1, show_progress: bool = True) -> int:
    """For each prompt, `n_iter` batches of `n_samples`: `samples/NNNNN.png` in prompt order, `grid-PPP.png` per
    prompt and one line per image in `samples.jsonl` (prompt, seed, LoRAs). Returns the number of images."""
    from tqdm.auto import tqdm

    pipeline.check(options)
    count = 0
    with open_for_writing(output / "samples.jsonl") as index, \
            tqdm(total=len(prompts) * options.n_iter, desc="sample", disable=not show_progress) as bar:
        for p, prompt in enumerate(prompts):
            batches = []
            for it in range(options.n_iter):
                images = generate(pipeline, prompt, options.n_samples, options, p, it)
                for image in images:
                    name = f"samples/{count:05d}.png"
                    save_png(output / name, image)
                    index.write(json.dumps({"file": name, "prompt": prompt, "prompt_index": p, "iteration": it,
                                            "seed": options.seed, "loras": [[str(a), s] for a, s in loras]}) + "\n")
                    count += 1
                batches.append(images)
                bar.update(1)
            grid = image_grid(np.concatenate(batches), columns=options.n_samples)
            save_png(output / f"grid-{p:03d}.png", grid, upscale=grid_scale)
    return count


def to_uint8_images(images: np.ndarray) -> np.ndarray:
    """Decoder output (N, 3, H, W) in [-1, 1] -> uint8 pictures (N, H, W, 3), rounded to nearest."""
    pixels = np.round((np.clip(images.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)


def load_embeddings(pipeline: Pipeline, files: list[tuple[str, str | None]], lora_paths: list[str] = ()) -> list[str]:
    """Put the embeddings of `files` ((path, token or None)) and those bundled in the LoRA files into the pipeline's
    text encoder and tokenizer; returns their names."""
    from msd_lora.embeddings.files import bundled_embeddings, read_embeddings
    from msd_lora.embeddings.install import install_embeddings
    from msd_lora.files.tensor_file import read_tensor_file
    from msd_lora.lora.formats import lora_file_path

    found, sources = [], []
    for path, token in files:
        for embedding in read_embeddings(path, token):
            found.append(embedding)
            sources.append(str(path))
    for path in lora_paths:
        for embedding in bundled_embeddings(read_tensor_file(lora_file_path(path)).tensors):
            found.append(embedding)
            sources.append(f"{path} (bundled)")
    if found:
        install_embeddings(pipeline.backend, pipeline.tokenizer, found, sources=sources)
    return [e.name for e in found]


def read_lora_files(pairs: list[tuple[str, float]], index: ModuleIndex) -> list[tuple[LoraWeights, float, str]]:
    """(weights, scale, path) of each LoRA file, any format (diffusers, kohya/A1111, old diffusers, mindone), names
    resolved against the model's own layout (`index`), so LDM-named and kohya files map onto exactly its layers."""
    from msd_lora.lora.formats import read_lora

    return [(read_lora(path, index).weights, float(scale), str(path)) for path, scale in pairs]


def follow_lora_training(pipeline: Pipeline, paths: list[str]) -> list[str]:
    """A LoRA trained with another prediction type than the model's, or on a zero-terminal-SNR schedule (recorded in
    msd-lora's metadata), samples the way it was trained: the pipeline's schedule follows the first such file.
    Returns notes saying so."""
    from msd_lora.files.safetensors_file import read_header
    from msd_lora.lora.formats import lora_file_path

    for path in paths:
        file = lora_file_path(path)
        if file.suffix != ".safetensors":
            continue
        metadata = read_header(file)[1].get("__metadata__", {})
        prediction = metadata.get("msd_lora.prediction_type", pipeline.schedule.prediction_type)
        zero_terminal = metadata.get("msd_lora.zero_terminal_snr") == "True"
        if prediction == pipeline.schedule.prediction_type and not zero_terminal:
            continue
        schedule = pipeline.schedule.with_prediction_type(prediction)
        pipeline.schedule = schedule.with_zero_terminal_snr().for_sampling() if zero_terminal else schedule
        pipeline.backend.prediction_type = prediction
        return [f"{path} was trained to predict {prediction}" + (" on a zero-terminal-SNR schedule" if zero_terminal
                                                                else "") + "; sampling does the same"]
    return []


def merge_loras(backend: Backend, loras: list[tuple[LoraWeights, float, str]]) -> None:
    """Merge (weights, scale, source) LoRAs into the backend's frozen weights: W += scale*alpha/r*B@A."""
    shapes = backend.base_shapes()
    for weights, _, source in loras:
        check_fits(weights, shapes, source=f"LoRA file {source}")
    names = sorted({base_name(key) for weights, _, _ in loras for key in weights})
    base = backend.base_weights(names)
    backend.set_base_weights(merged_weights(base, [(w, s) for w, s, _ in loras]))


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Tile (N, H, W, 3) images into one picture, `columns` wide (default: as square as possible)."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * h, columns * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def save_png(path: Path, image: np.ndarray, upscale: int = 1) -> None:
    """Write a PNG atomically (a link at `path` is replaced, not written through)."""
    from PIL import Image

    picture = Image.fromarray(image)
    if upscale > 1:
        picture = picture.resize((image.shape[1] * upscale, image.shape[0] * upscale), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
