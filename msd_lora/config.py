"""The training configuration: mindone's flat yaml keys as one typed, frozen dataclass, defaults < yaml < flags.

    cfg = load_train_config(["--train_config", "configs/train/lora_tiny.yaml", "--lora_rank", "8"])
    cfg.lora_rank  # 8

Each field says its type, help, choices or range and whether it is a path (`msd_lora.options`); every value is
checked when the config is built, each error naming where the value came from (the yaml file or the command
line), the key and the value. Relative paths in a yaml resolve against the yaml's folder, then the repository
root; relative paths on the command line against the working directory. Unknown keys are errors that suggest the
closest valid key.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from msd_lora.data.sources import SOURCE_KINDS
from msd_lora.diffusion.losses import HUBER_SCHEDULES, LOSS_TYPES
from msd_lora.diffusion.samplers import SAMPLERS
from msd_lora.errors import ConfigError
from msd_lora.optimizers import OPTIMIZERS
from msd_lora.options import FALSE, TRUE, add_arguments, check_keys, coerce_all, fields_of, setting, suggest, to_plain
from msd_lora.tokenizer import TOKEN_LENGTHS

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULTS, COMMAND_LINE = "defaults", "command line"
# mindone's names for the same settings (its train yamls load verbatim)
ALIASES = {"num_workers": "dataloader_num_workers", "image_filter_size": "min_image_size",
           # mindone's DreamBooth and textual-inversion yamls
           "instance_data_dir": "data_path", "train_data_dir": "data_path", "train_text_encoder": "lora_ft_text_encoder",
           "scale": "class_guidance_scale", "placeholder_token": "placeholder_tokens",
           "initializer_token": "initializer_tokens", "num_vectors": "num_vectors_per_token",
           "learnable_property": "use_template", "max_steps": "max_train_steps"}
# kohya sd-scripts' names for the same settings
ALIASES.update(conv_dim="conv_rank", sample_sampler="validation_sampler", min_snr_gamma="snr_gamma",
               ip_noise_gamma="input_perturbation",
               debiased_estimation_loss="debiased_estimation")


@dataclass(frozen=True)
class TrainConfig:
    # system
    backend: str = setting("torch", "training backend", choices=("torch", "mindspore"))
    mode: int = setting(0, "MindSpore execution mode: 0 graph, 1 pynative", choices=(0, 1))
    device: str = setting("auto", "device: auto (CUDA / the MindSpore default when present), cpu, cuda[:N] / gpu, "
                                  "ascend")
    mixed_precision: str = setting("no", "torch autocast on CUDA", choices=("no", "fp16", "bf16"))
    enable_flash_attention: bool = setting(False, "MindSpore on Ascend: flash attention in the UNet (fp16 kernel)")
    gradient_checkpointing: bool = setting(False, "recompute each UNet block (and text-encoder layer) in the backward "
                                                  "pass: less memory, about a third more time per step")
    seed: int = setting(3407, "seed for LoRA init, data order, noise and timesteps", low=0)
    use_parallel: bool = setting(False, "data-parallel training (not available yet; must stay False)")
    # model and paths
    model_config: str = setting("", "architecture + schedule yaml; empty = the diffusers folder's own configs, or "
                                    "the SD version detected from a single file's weights", path=True)
    pretrained_model_path: str = setting("msd_lora/assets/tiny_sd", "base model: a diffusers folder, an LDM single "
                                         "file (.safetensors / .ckpt) or a mindone .ckpt", path=True)
    data_path: str = setting("", "dataset folder: mindone img_txt.csv, kohya N_name folders, a Hugging Face imagefolder "
                                 "(metadata.jsonl / .csv) or plain images with instance_prompt (docs/data.md)",
                             path=True)
    output_path: str = setting("output/", "where checkpoints, logs and samples go", path=True)
    resume: bool | str = setting(False, "False, True (output_path/ckpt/train_resume.safetensors) or a resume file",
                                 path=True)
    overwrite: bool = setting(False, "replace a previous run's files in output_path (otherwise a folder holding a "
                                     "run is refused unless resume)")
    # data
    dataset_type: str = setting("auto", "dataset layout; auto = detected from data_path", choices=SOURCE_KINDS)
    caption_extension: str = setting("", "kohya folders: caption file extension; empty = .caption, then .txt")
    caption_column: str = setting("text", "imagefolder / csv: the caption column")
    instance_prompt: str = setting("", "caption of every image of a plain image folder (DreamBooth: the prompt with "
                                       "the rare token, e.g. 'a photo of sks dog')")
    train_batch_size: int = setting(4, "images per micro-batch", low=1)
    image_size: int = setting(512, "training resolution (square; with buckets, the side of the bucket area)", low=8)
    min_image_size: int = setting(0, "skip images whose short side is smaller (mindone: image_filter_size)", low=0)
    random_crop: bool = setting(False, "random instead of center crop")
    flip: bool = setting(False, "random horizontal flip")
    dataloader_num_workers: int = setting(1, "threads preparing batches ahead of the step (mindone: num_workers); "
                                             "results do not depend on it", low=0, high=64)
    # DreamBooth: prior preservation (docs/dreambooth.md)
    with_prior_preservation: bool = setting(False, "train every batch on instance and class images: loss = instance + "
                                                   "prior_loss_weight x class")
    class_data_dir: str = setting("", "class (regularisation) images: a plain folder captioned class_prompt, or any "
                                      "dataset layout; missing ones are generated", path=True)
    reg_data_dir: str = setting("", "kohya's name for the class images (N_class folders): sets class_data_dir and "
                                    "with_prior_preservation", path=True)
    class_prompt: str = setting("", "caption of the class images, and the prompt they are generated from (e.g. 'a "
                                    "photo of a dog')")
    num_class_images: int = setting(0, "class images wanted: missing ones are generated by the base model before "
                                       "training (0 = use the folder as it is)", low=0)
    prior_loss_weight: float = setting(1.0, "weight of the class images' loss", low=0.0, low_open=True)
    class_guidance_scale: float = setting(7.5, "classifier-free guidance of the generated class images (mindone: "
                                               "scale)", low=0.0, high=100.0)
    sample_batch_size: int = setting(4, "class images generated per sampler call", low=1, high=256)
    # pivotal tuning / textual inversion (docs/dreambooth.md)
    placeholder_tokens: tuple[str, ...] = setting((), "new tokens to learn embeddings for, e.g. <sks> or '<s1> <s2>' "
                                                      "(mindone: placeholder_token)", split=True)
    initializer_tokens: tuple[str, ...] = setting((), "a word each new token starts from (one for all, or one per "
                                                      "token); empty = <rand-0.017>; also <zero>", split=True)
    num_vectors_per_token: int = setting(1, "embedding vectors per new token (mindone: num_vectors)", low=1, high=75)
    learning_rate_ti: float = setting(5e-4, "learning rate of the new embeddings", low=0.0, low_open=True, high=1.0)
    weight_decay_ti: float = setting(0.0, "weight decay of the new embeddings", low=0.0, high=1.0)
    clip_ti_decay: bool = setting(True, "after each embedding update pull its norm towards 0.4 by min(1, 100 x lr) "
                                        "(lora_pti)")
    ti_steps: int = setting(0, "first optimizer steps train only the embeddings (the LoRA's rate is 0), then the LoRA; "
                               "0 = embeddings and LoRA train together throughout", low=0)
    continue_inversion: bool = setting(False, "keep training the embeddings after ti_steps (pivotal tuning)")
    continue_inversion_lr: float | None = setting(None, "their learning rate then; empty = learning_rate_ti", low=0.0,
                                                  low_open=True, high=1.0)
    use_template: str = setting("", "captions from templates around the tokens instead of the data's (mindone: "
                                    "learnable_property)", choices=("", "object", "style"))
    save_embeddings_in_lora: bool = setting(False, "also bundle the embeddings into lora.safetensors (bundle_emb.*, "
                                                   "which A1111 reads)")
    # captions
    caption_dropout_rate: float = setting(0.0, "probability of training on the empty caption (for guidance)", low=0.0,
                                          high=1.0)
    shuffle_caption: bool = setting(False, "shuffle the caption's separated tags at every step")
    keep_tokens: int = setting(0, "with shuffle_caption: leading tags kept in place", low=0)
    caption_separator: str = setting(",", "the tag separator for shuffle_caption")
    caption_prefix: str = setting("", "text put before every caption (joined with a space)")
    caption_suffix: str = setting("", "text put after every caption (joined with a space)")
    max_token_length: int = setting(75, "caption tokens encoded (75, 150 or 225: 75-token chunks, kohya/A1111 "
                                        "style); longer captions are truncated with a warning", choices=TOKEN_LENGTHS)
    # aspect-ratio buckets
    enable_bucket: bool = setting(False, "train each image at the aspect-ratio bucket nearest its own")
    min_bucket_reso: int = setting(256, "smallest bucket side", low=8)
    max_bucket_reso: int = setting(1024, "largest bucket side", low=8)
    bucket_reso_steps: int = setting(64, "bucket sides are multiples of this", low=8)
    bucket_no_upscale: bool = setting(False, "images smaller than image_size² keep their size (bucket rounded down)")
    bucket_graphs: str = setting("auto", "MindSpore graph mode: one dynamic-shape train graph for every bucket, one "
                                         "static graph per bucket shape, or auto (dynamic with 2+ buckets)",
                                 choices=("auto", "dynamic", "per_shape"))
    # caches
    cache_latents: bool = setting(False, "encode each image with the VAE once (centre crop; flips cached both ways)")
    cache_text_embeddings: bool = setting(False, "encode each caption once (text encoder frozen, no shuffle_caption)")
    cache_to_disk: bool = setting(False, "keep the caches on disk under cache_dir, reused by later runs")
    cache_dir: str = setting("", "where cache_to_disk writes; empty = $MSD_LORA_CACHE or ~/.cache/msd_lora", path=True)
    # schedule of the run
    epochs: int = setting(10, "passes over the dataset (ignored when max_train_steps > 0)", low=1)
    max_train_steps: int = setting(0, "optimizer steps to run; 0 = epochs x steps per epoch", low=0)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", low=1)
    ckpt_save_interval: int = setting(1, "save a LoRA checkpoint every N epochs (or steps with step_mode)", low=1)
    step_mode: bool = setting(False, "count ckpt_save_interval in steps instead of epochs")
    log_interval: int = setting(1, "write a log row every N optimizer steps", low=1)
    # loss (docs/training.md)
    prediction_type: str = setting("", "what the UNet learns to predict; empty = the model's own (its scheduler "
                                       "config / model yaml)", choices=("", "epsilon", "v_prediction"))
    zero_terminal_snr: bool = setting(False, "rescale the betas so the last timestep is pure noise (needs "
                                             "v_prediction)")
    snr_gamma: float | None = setting(None, "min-SNR-gamma loss weighting (5 is usual; kohya: min_snr_gamma); "
                                            "empty = off", low=0.0, low_open=True)
    debiased_estimation: bool = setting(False, "weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v_prediction)")
    loss_type: str = setting("l2", "l2 (squared error), huber (pseudo-Huber) or smooth_l1", choices=LOSS_TYPES)
    huber_c: float = setting(0.1, "Huber threshold (huber, smooth_l1)", low=0.0, low_open=True, high=1.0)
    huber_schedule: str = setting("snr", "how the Huber threshold varies with the timestep", choices=HUBER_SCHEDULES)
    noise_offset: float = setting(0.0, "noise offset strength (0.05-0.1 usual; 0 = off)", low=0.0, high=1.0)
    adaptive_noise_scale: float = setting(0.0, "with noise_offset: add this times |latent channel mean| to it",
                                          low=-1.0, high=1.0)
    multires_noise_iterations: int = setting(0, "multi-resolution (pyramid) noise levels (6-10 usual; 0 = off)",
                                             low=0, high=64)
    multires_noise_discount: float = setting(0.3, "weight ratio between pyramid noise levels", low=0.0,
                                             low_open=True, high=1.0)
    input_perturbation: float = setting(0.0, "extra noise on the UNet's input only (0.1 usual; kohya: "
                                             "ip_noise_gamma; 0 = off)", low=0.0, high=1.0)
    # learning rate
    scheduler: str = setting("cosine_decay", "lr schedule", choices=("constant", "cosine_decay", "linear_decay",
                                                                    "multi_step_decay"))
    milestones: tuple[int, ...] = setting((), "multi_step_decay: steps where the rate is multiplied by decay_rate",
                                          split=True)
    decay_rate: float = setting(0.9, "multi_step_decay: the factor at each milestone", low=0.0, low_open=True,
                                high=1.0)
    scale_lr: bool = setting(False, "multiply the learning rates by train_batch_size x gradient_accumulation_steps "
                                    "(mindone, diffusers)")
    version: str = setting("", "mindone's SD version key (1.5, 2.0, ...): informational, the model's files decide")
    start_learning_rate: float = setting(1e-4, "peak learning rate", low=0.0, low_open=True, high=1.0)
    end_learning_rate: float = setting(0.0, "final learning rate of a decaying schedule", low=0.0, high=1.0)
    unet_lr: float | None = setting(None, "peak learning rate of the UNet LoRA; empty = start_learning_rate (the "
                                          "schedule's shape applies to each part)", low=0.0, high=1.0)
    text_encoder_lr: float | None = setting(None, "peak learning rate of the text-encoder LoRA; empty = "
                                                  "start_learning_rate", low=0.0, high=1.0)
    warmup_steps: int = setting(0, "linear warmup steps", low=0)
    decay_steps: int = setting(0, "decay length after warmup; 0 = until the last step", low=0)
    # optimizer
    optim: str = setting("adamw", "optimizer: adamw, prodigy (adaptive step size: keep the learning rate at 1.0) "
                                  "or adafactor (factored second moments; docs/training.md)", choices=OPTIMIZERS)
    prodigy_d_coef: float = setting(1.0, "prodigy: multiplier of the estimated step size (2 is a common choice)",
                                    low=0.0, low_open=True, high=100.0)
    prodigy_use_bias_correction: bool = setting(False, "prodigy: Adam's bias correction of the step size "
                                                       "(recommended for diffusion by prodigy's authors)")
    prodigy_safeguard_warmup: bool = setting(False, "prodigy: leave the learning rate out of the step-size estimate "
                                                    "(use with warmup)")
    betas: tuple[float, ...] = setting((0.9, 0.999), "AdamW / prodigy betas: beta1, beta2", low=0.0, high=1.0, high_open=True,
                                       split=True)
    weight_decay: float = setting(1e-2, "decoupled weight decay", low=0.0, high=1.0)
    optim_eps: float = setting(1e-8, "AdamW epsilon", low=0.0, low_open=True, high=1.0)
    clip_grad: bool = setting(False, "clip the global gradient norm")
    max_grad_norm: float = setting(1.0, "global norm for clip_grad", low=0.0, low_open=True)
    # loss scaling (MindSpore fp16; torch uses GradScaler on CUDA fp16)
    loss_scaler_type: str = setting("dynamic", "loss scaler", choices=("dynamic", "static", "none"))
    init_loss_scale: float = setting(65536.0, "initial loss scale", low=1.0, high=2.0 ** 32)
    loss_scale_factor: float = setting(2.0, "scale divisor on overflow / multiplier after a clean window", low=1.0,
                                       low_open=True, high=1024.0)
    scale_window: int = setting(1000, "clean steps before the loss scale grows", low=1)
    # EMA
    use_ema: bool = setting(False, "keep an exponential moving average of the LoRA weights")
    ema_decay: float = setting(0.9999, "EMA decay: ema <- decay * ema + (1 - decay) * weights", low=0.0, high=1.0)
    # LoRA
    use_lora: bool = setting(True, "LoRA fine-tuning (full fine-tuning is not offered)")
    lora_rank: int = setting(4, "LoRA rank r", low=1)
    lora_alpha: float | None = setting(None, "LoRA alpha; update scale is alpha/r (default: alpha = r)", low=0.0,
                                       low_open=True)
    lora_ft_unet: bool = setting(True, "LoRA on the UNet")
    lora_ft_text_encoder: bool = setting(False, "LoRA on the text encoder")
    lora_fp16: bool = setting(False, "MindSpore: LoRA matmuls in float16, float32 master weights")
    lora_init: str = setting("kaiming", "init of the down factor A (the up factor B starts at zero)",
                             choices=("kaiming", "gaussian"))
    init_lora_path: str = setting("", "start from this LoRA (a file in any format msd-lora reads, or a diffusers LoRA "
                                      "folder); its layers must be among the targets, with rank lora_rank", path=True)
    lora_target_modules: tuple[str, ...] = setting(("to_q", "to_k", "to_v", "to_out.0"), "UNet module names for LoRA "
                                                   "(name suffixes), or one preset: attention, lierla (attention + "
                                                   "feed-forward + proj), c3lier (lierla + ResNet and sampler convs)",
                                                   split=True)
    lora_te_target_modules: tuple[str, ...] = setting(("q_proj", "k_proj", "v_proj", "out_proj"),
                                                      "text-encoder module names for LoRA, or a preset (attention; "
                                                      "lierla / c3lier add the MLP)", split=True)
    lora_type: str = setting("lora", "lora, or dora (weight-decomposed: a trained magnitude per output channel)",
                             choices=("lora", "dora"))
    use_rslora: bool = setting(False, "rank-stabilised LoRA: update scale alpha / sqrt(rank) instead of alpha / rank")
    lora_dropout: float = setting(0.0, "dropout on each LoRA branch's input (peft's lora_dropout)", low=0.0, high=1.0,
                                  high_open=True)
    network_dropout: float = setting(0.0, "dropout on each LoRA down projection's output (kohya's network_dropout)",
                                     low=0.0, high=1.0, high_open=True)
    conv_rank: int | None = setting(None, "rank of LoRAs on convolutions larger than 1x1 (LoCon; kohya: conv_dim); "
                                          "empty = lora_rank", low=1)
    conv_alpha: float | None = setting(None, "alpha of those LoRAs; empty = conv_rank (lora_alpha when conv_rank is "
                                             "empty)", low=0.0, low_open=True)
    # samples and validation during training (docs/training.md)
    validation_prompts: tuple[str, ...] = setting((), "prompts sampled during and at the end of training (default: "
                                                      "the dataset's first two captions)")
    validation_negative_prompt: str = setting("", "negative prompt of the validation samples")
    validation_steps: int = setting(25, "sampler steps for validation images", low=1, high=1000)
    validation_sampler: str = setting("dpm_solver_pp", "sampler for validation images", choices=SAMPLERS)
    validation_guidance_scale: float = setting(5.0, "classifier-free guidance for validation images", low=0.0,
                                               high=100.0)
    validation_images: int = setting(4, "images per validation prompt", low=1, high=64)
    validation_seed: int | None = setting(None, "seed of the validation samples' noise; empty = seed", low=0)
    sample_every_n_steps: int = setting(0, "draw the validation samples every N optimizer steps (0 = only at the "
                                           "end), from the checkpoint saved at that step", low=0)
    sample_every_n_epochs: int = setting(0, "draw them every N epochs (0 = off)", low=0)
    validation_split: float = setting(0.0, "share of the dataset's images held out for the validation loss (0 = "
                                           "none)", low=0.0, high=0.5)
    validation_data_path: str = setting("", "a dataset folder for the validation loss instead of a split",
                                        path=True)
    validate_every_n_steps: int = setting(0, "validation loss every N optimizer steps (0: at every checkpoint "
                                             "save) when held-out data is set", low=0)
    validate_every_n_epochs: int = setting(0, "validation loss every N epochs (0 = off)", low=0)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with `changes`, checked like any other value."""
        check_keys(TrainConfig, changes, "replace()")
        values = {**self.to_dict(), **changes}
        return build_config(values, {k: "replace()" for k in changes})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def build_config(values: Mapping[str, Any], origins: Mapping[str, str]) -> TrainConfig:
    """Type and check every value (each error names its origin), fill the derived defaults, check across keys."""
    typed = coerce_all(TrainConfig, values, origins)
    where = lambda key: origins.get(key, DEFAULTS)  # noqa: E731
    if len(typed["betas"]) != 2:
        raise ConfigError(f"{where('betas')}: 'betas' must be two numbers (beta1, beta2), got {list(typed['betas'])}")
    if not typed["use_lora"] and not typed["placeholder_tokens"]:
        raise ConfigError(f"{where('use_lora')}: 'use_lora' is False, but msd-lora trains LoRAs (or, with "
                          f"placeholder_tokens, embeddings) only; set use_lora: True")
    if typed["use_parallel"]:
        raise ConfigError(f"{where('use_parallel')}: 'use_parallel' (data-parallel training) is not available yet; "
                          f"set use_parallel: False")
    if not (typed["lora_ft_unet"] or typed["lora_ft_text_encoder"]):
        raise ConfigError(f"{where('lora_ft_unet')}: nothing to train: set lora_ft_unet or lora_ft_text_encoder to "
                          f"True")
    if typed["end_learning_rate"] > typed["start_learning_rate"] and typed["scheduler"] != "constant":
        raise ConfigError(f"{where('end_learning_rate')}: 'end_learning_rate' {typed['end_learning_rate']:g} is above "
                          f"start_learning_rate {typed['start_learning_rate']:g}: a decaying schedule ends lower")
    if typed["lora_alpha"] is None:
        typed["lora_alpha"] = float(typed["lora_rank"])
    if typed["cache_latents"] and typed["random_crop"]:
        raise ConfigError(f"{where('cache_latents')}: cache_latents needs the same crop at every step, but "
                          f"random_crop is on: turn one of them off (flip is fine: both flips are cached)")
    if typed["cache_text_embeddings"] and typed["lora_ft_text_encoder"]:
        raise ConfigError(f"{where('cache_text_embeddings')}: cache_text_embeddings needs a frozen text encoder, but "
                          f"lora_ft_text_encoder is on: turn one of them off")
    if typed["cache_text_embeddings"] and typed["shuffle_caption"]:
        raise ConfigError(f"{where('cache_text_embeddings')}: cache_text_embeddings cannot cache captions that "
                          f"shuffle_caption changes at every step: turn one of them off")
    if typed["cache_to_disk"] and not (typed["cache_latents"] or typed["cache_text_embeddings"]):
        raise ConfigError(f"{where('cache_to_disk')}: cache_to_disk is on but nothing is cached: set cache_latents "
                          f"and/or cache_text_embeddings")
    if typed["validation_split"] and typed["validation_data_path"]:
        raise ConfigError(f"{where('validation_split')}: validation_split and validation_data_path both give held-out "
                          f"images: set one of them")
    if (typed["validate_every_n_steps"] or typed["validate_every_n_epochs"]) and not (
            typed["validation_split"] or typed["validation_data_path"]):
        key = "validate_every_n_steps" if typed["validate_every_n_steps"] else "validate_every_n_epochs"
        raise ConfigError(f"{where(key)}: {key} is set but there are no held-out images: set validation_split (e.g. "
                          f"0.1) or validation_data_path")
    if typed["optim"] == "prodigy" and (typed["unet_lr"] is not None or typed["text_encoder_lr"] is not None):
        key = "unet_lr" if typed["unet_lr"] is not None else "text_encoder_lr"
        raise ConfigError(f"{where(key)}: prodigy estimates one step size for every LoRA weight (prodigyopt allows no "
                          f"per-part rates): leave unet_lr and text_encoder_lr empty")
    if typed["optim"] == "prodigy" and typed["scheduler"] != "constant" and typed["end_learning_rate"] == 0 \
            and typed["decay_steps"]:
        raise ConfigError(f"{where('decay_steps')}: with prodigy the learning rate must stay above 0 (prodigyopt fails "
                          f"at 0), but decay_steps {typed['decay_steps']} with end_learning_rate 0 reaches it: set "
                          f"end_learning_rate above 0 or decay_steps 0")
    if typed["lora_dropout"] and typed["lora_type"] == "dora":
        raise ConfigError(f"{where('lora_dropout')}: lora_dropout with lora_type dora is not offered (peft then runs "
                          f"the frozen layer a second time on the dropped input); use network_dropout with DoRA")
    if typed["conv_alpha"] is not None and typed["conv_rank"] is None:
        raise ConfigError(f"{where('conv_alpha')}: conv_alpha is set but conv_rank is not: set conv_rank too (or use "
                          f"lora_alpha for every layer)")
    if typed["adaptive_noise_scale"] and not typed["noise_offset"]:
        raise ConfigError(f"{where('adaptive_noise_scale')}: adaptive_noise_scale adjusts noise_offset, which is 0: set "
                          f"noise_offset (e.g. 0.05) or leave adaptive_noise_scale at 0")
    if typed["zero_terminal_snr"] and typed["prediction_type"] == "epsilon":
        raise ConfigError(f"{where('zero_terminal_snr')}: zero_terminal_snr needs prediction_type v_prediction (at the "
                          f"last timestep the input is pure noise, so predicting the noise is trivial and the image is "
                          f"never learnt): set prediction_type: v_prediction")
    if typed["min_bucket_reso"] > typed["max_bucket_reso"]:
        raise ConfigError(f"{where('min_bucket_reso')}: min_bucket_reso {typed['min_bucket_reso']} is above "
                          f"max_bucket_reso {typed['max_bucket_reso']}")
    check_dreambooth(typed, where)
    check_pivotal_tuning(typed, where)
    if typed["scale_lr"]:
        factor = typed["train_batch_size"] * typed["gradient_accumulation_steps"]
        for key in ("start_learning_rate", "end_learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_ti",
                    "continue_inversion_lr"):
            if typed[key] is not None:
                typed[key] = typed[key] * factor
        typed["scale_lr"] = False  # applied: the saved config holds the scaled rates
    if typed["resume"] is not False and typed["overwrite"]:
        raise ConfigError(f"{where('overwrite')}: 'overwrite' and 'resume' exclude each other: resume continues the "
                          f"run in output_path, overwrite replaces it")
    return TrainConfig(**typed)


def check_dreambooth(typed: dict[str, Any], where) -> None:
    """DreamBooth keys across each other (kohya's reg_data_dir becomes class_data_dir with prior preservation)."""
    if typed["reg_data_dir"]:
        if typed["class_data_dir"]:
            raise ConfigError(f"{where('reg_data_dir')}: reg_data_dir and class_data_dir both name the class images: "
                              f"set one of them")
        typed.update(class_data_dir=typed["reg_data_dir"], with_prior_preservation=True)
    if typed["num_class_images"] and not typed["class_prompt"]:
        raise ConfigError(f"{where('num_class_images')}: num_class_images {typed['num_class_images']} asks for class "
                          f"images to be generated, but class_prompt is empty: set class_prompt (e.g. 'a photo of a "
                          f"dog'), the prompt they are generated from")
    if typed["with_prior_preservation"]:
        if not typed["class_data_dir"]:
            raise ConfigError(f"{where('with_prior_preservation')}: with_prior_preservation needs class_data_dir (the "
                              f"folder of class images, generated there when num_class_images is set)")
        if typed["enable_bucket"]:
            raise ConfigError(f"{where('enable_bucket')}: with_prior_preservation pairs instance and class images in "
                              f"one batch of one size: set enable_bucket: False")
        if typed["validation_split"] or typed["validation_data_path"]:
            raise ConfigError(f"{where('with_prior_preservation')}: a validation loss with prior preservation is not "
                              f"offered: leave validation_split and validation_data_path unset")


def check_pivotal_tuning(typed: dict[str, Any], where) -> None:
    """Textual-inversion keys: tokens split on spaces and '|' (lora_pti's separator), and the run's settings."""
    tokens = tuple(t for item in typed["placeholder_tokens"] for t in item.replace("|", " ").split())
    initializers = tuple(t for item in typed["initializer_tokens"] for t in item.replace("|", " ").split())
    typed.update(placeholder_tokens=tokens, initializer_tokens=initializers)
    if not tokens:
        return
    if len(set(tokens)) != len(tokens):
        raise ConfigError(f"{where('placeholder_tokens')}: placeholder_tokens {list(tokens)} repeat a token")
    if len(initializers) not in (0, 1, len(tokens)):
        raise ConfigError(f"{where('initializer_tokens')}: {len(initializers)} initializer_tokens for {len(tokens)} "
                          f"placeholder_tokens: give one for all, or one per token")
    for key, problem in (("use_ema", typed["use_ema"]), ("optim", typed["optim"] != "adamw"),
                         ("cache_text_embeddings", typed["cache_text_embeddings"])):
        if problem:
            raise ConfigError(f"{where(key)}: placeholder_tokens train with optim adamw, no EMA and no text cache "
                              f"(the text encoder's input changes as they train); {key} is {typed[key]}")


def resolve_path(value: str, base: Path | None) -> str:
    """Absolute path for a config path value.

    From a yaml (`base` = its folder): where the path exists, first beside the yaml, then under the
    repository root; a path that exists nowhere yet (an output folder) goes under the repository root
    for the shipped configs (yamls inside the repo) and beside the yaml otherwise.
    From the command line (`base` None): the working directory.
    """
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if base is None:
        return str(Path.cwd() / path)
    for root in (base, REPO_ROOT):
        if (root / path).exists():
            return str((root / path).resolve())
    home = REPO_ROOT if base.resolve().is_relative_to(REPO_ROOT) else base
    return str((home / path).resolve())


def resolve_paths(values: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """Every path value of `values` (a `resume` of True/False is not a path) resolved against `base`."""
    infos = fields_of(TrainConfig)
    out = dict(values)
    for key, value in values.items():
        if infos[key].setting.path and isinstance(value, str) and value.strip().lower() not in TRUE | FALSE:
            out[key] = resolve_path(value, base)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A flat train yaml's keys, paths resolved against its folder."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config {path} does not exist")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    except Exception as err:  # omegaconf raises several parser error types
        raise ConfigError(f"{path}: not valid yaml: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    raw = unalias(raw, str(path))
    check_keys(TrainConfig, raw, str(path))
    return resolve_paths(raw, path.parent.resolve())


def unalias(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """mindone's key names (`ALIASES`) as ours; giving both names of one setting is an error. A source naming the
    singular `placeholder_token` (mindone's and diffusers' textual-inversion scripts, which train embeddings alone)
    and not `use_lora` trains no LoRA."""
    out = dict(values)
    if "placeholder_token" in out and "use_lora" not in out:
        out["use_lora"] = False
    for alias, key in ALIASES.items():
        if alias in out:
            if key in out and out[key] != out[alias]:  # mindone's DreamBooth yaml gives both, equal
                raise ConfigError(f"{origin}: '{alias}' and '{key}' are the same setting; give one of them")
            out[key] = out.pop(alias)
    return out


def build_parser(description: str = "Train a Stable Diffusion LoRA.") -> argparse.ArgumentParser:
    """One flag per config key; a flag left out never overrides the yaml."""
    from msd_lora.cli.errors import add_debug_flag

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--train_config", default=argparse.SUPPRESS, help="yaml with any of the keys below")
    add_arguments(parser, TrainConfig)
    for alias, key in ALIASES.items():
        parser.add_argument(f"--{alias}", dest=f"alias.{alias}", default=argparse.SUPPRESS, help=f"same as --{key}")
    add_debug_flag(parser)
    return parser


def load_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """defaults < yaml (--train_config) < explicit command-line flags -> a checked TrainConfig."""
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        flag = unknown[0].lstrip("-").split("=")[0]
        raise ConfigError(f"{COMMAND_LINE}: unknown flag '{unknown[0]}'.{suggest(flag, list(fields_of(TrainConfig)))}")
    explicit = vars(args)
    explicit.pop("debug", None)
    aliased = {k.removeprefix("alias."): explicit.pop(k) for k in list(explicit) if k.startswith("alias.")}
    explicit = unalias({**explicit, **aliased}, COMMAND_LINE)
    values = resolve_paths({k: i.default for k, i in fields_of(TrainConfig).items()}, REPO_ROOT)
    origins: dict[str, str] = {}
    if "train_config" in explicit:
        source = explicit.pop("train_config")
        from_yaml = read_yaml(source)
        values.update(from_yaml)
        origins.update({k: str(source) for k in from_yaml})
    values.update(resolve_paths(explicit, None))
    origins.update({k: COMMAND_LINE for k in explicit})
    return build_config(values, origins)


def write_config(cfg: TrainConfig, path: str | Path) -> None:
    """The merged config as yaml (it loads back as a --train_config), written atomically. `overwrite` is saved as
    False: it was an action of that run (replace what was there), not a setting to repeat, and with it the saved
    config could not be resumed."""
    from msd_lora.files.atomic import atomic_write_text

    values = {k: to_plain(v) for k, v in cfg.to_dict().items()} | {"overwrite": False}
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
