"""The backend-neutral LoRA training loop.

Everything random is drawn here in numpy from the seed and the micro-step index (batch order, crops,
timesteps, diffusion noise, VAE posterior noise), so a resumed run continues bit-exactly and two backends
see the same numbers. The backend only runs the networks and the optimizer.

A run owns its output folder (`msd_lora.output_folder`): a folder holding another run is refused unless the run
resumes it or overwrites it, and it is locked while the run trains. Ctrl-C finishes the current step, saves a
checkpoint and says how to resume (a second Ctrl-C stops at once).
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.backends.base import Backend, BackendOptions, OptimizerSettings, StepBatch, get_backend
from msd_lora.checkpoint import RESUME_NAME, ResumeState, load_resume, save_resume
from msd_lora.config import TrainConfig, write_config
from msd_lora.data.class_images import generate_class_images
from msd_lora.diffusion.losses import LossOptions
from msd_lora.diffusion.schedule import NoiseSchedule
from msd_lora.embeddings.files import bundle_tensors, write_run_embeddings
from msd_lora.embeddings.install import install_embeddings, placeholder_embeddings
from msd_lora.embeddings.tokens import Embedding
from msd_lora.errors import ConfigError, LoraMismatchError, ResumeError
from msd_lora.files.atomic import atomic_write_text
from msd_lora.held_out import ValidationLoss
from msd_lora.lora.formats import lora_file_path, write_lora
from msd_lora.lora.init_from import start_from_file
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
from msd_lora.loss_plot import plot_losses
from msd_lora.lr_schedule import learning_rate
from msd_lora.models.model_config import ModelConfig
from msd_lora.models.pretrained import load_model
from msd_lora.output_folder import OutputFolder
from msd_lora.sample import Pipeline, SamplingOptions, generate, image_grid, save_png
from msd_lora.train_inputs import PairedInputs, RunData
from msd_lora.train_log import TrainLog
from msd_lora.train_samples import sample_from_file, validation_options

RUN_OUTPUTS = ("lora.safetensors", "lora_mindone.ckpt", "train_config.yaml", "train_log.csv", "ckpt", "validation",
               "tensorboard", "buckets.json", "samples", "loss.png", "embeddings")
ROWS_STATE = "embeddings.rows"  # the resume file's copy of the trained embedding rows


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C: the run stopped after a finished step, with a checkpoint saved (the message says how to resume)."""


@dataclass(frozen=True)
class RunPlan:
    micro_steps_per_epoch: int
    accumulation: int
    total_steps: int  # optimizer steps
    ti_steps: int = 0  # the first steps train only the embeddings (pivotal tuning's inversion phase)

    def epoch_of(self, step: int) -> float:
        """Epochs completed after `step` optimizer steps."""
        return step * self.accumulation / self.micro_steps_per_epoch


@dataclass
class TrainResult:
    output_path: Path
    lora_path: Path | None  # None for textual inversion alone (use_lora False)
    steps: int
    skipped_steps: int
    final_loss: float
    embedding_paths: tuple[Path, ...] = ()  # the trained embeddings' files (A1111 / kohya, diffusers)


class Trainer:
    """Holds one run's pieces; `run()` trains from step 0 or from the resume state."""

    def __init__(self, cfg: TrainConfig, backend: Backend | None = None, show_progress: bool = True):
        self.cfg = cfg
        self.show_progress = show_progress
        self.folder = OutputFolder(cfg.output_path, RUN_OUTPUTS, "training run", overwrite=cfg.overwrite,
                                   resume=cfg.resume is not False)
        self.folder.check()  # before minutes of loading: a folder holding another run is refused now
        self.output = Path(cfg.output_path)
        if not cfg.data_path:
            raise ConfigError("data_path is not set: give --data_path FOLDER (or data_path: in the yaml), a dataset "
                              "folder (docs/data.md)")
        if cfg.init_lora_path:
            lora_file_path(cfg.init_lora_path)  # exists: checked before the model loads
        self.notes = []
        if cfg.with_prior_preservation and cfg.num_class_images:
            present, made = generate_class_images(cfg, self._progress)
            self.notes.append(f"class images: {present} in {cfg.class_data_dir}" + (
                f", {made} generated from '{cfg.class_prompt}'" if made else f" (num_class_images {cfg.num_class_images})"))
        pretrained, self.model_config = load_model(cfg.pretrained_model_path, cfg.model_config or None)
        self.schedule = training_schedule(cfg, self.model_config)
        self.notes += [n for n in (self.model_config.note, pretrained.metadata.get("note")) if n]
        self.module_index = ModuleIndex.for_model(pretrained.configs)
        self.data = RunData.from_config(cfg, pretrained)
        self.dataset, self.order, self.captions = self.data.dataset, self.data.order, self.data.captions
        self.tokenizer = self.data.tokenizer
        self.notes += self.data.truncation_notes()
        dynamic = cfg.bucket_graphs == "dynamic" or (cfg.bucket_graphs == "auto" and len(self.dataset.buckets) > 1)
        self.backend = backend or get_backend(cfg.backend, BackendOptions.from_config(cfg, dynamic_shapes=dynamic))
        self.info = self.backend.load_model(pretrained, self.schedule.prediction_type)
        if cfg.image_size % self.info.vae_scale_factor:
            raise ConfigError(f"image_size {cfg.image_size} is not a multiple of the VAE's downscale factor "
                              f"{self.info.vae_scale_factor}")
        self.pipeline = Pipeline(self.backend, self.info, self.tokenizer, self.schedule.for_sampling(), cfg.image_size,
                                 self.module_index)
        self.pipeline.check(self.validation_options())  # a bad validation setting fails now, not after training
        self.spec = LoraSpec.from_config(cfg)
        shapes = self.backend.layer_shapes()
        targets = select_targets(self.spec, shapes)
        base = self.backend.base_weights([f"{c}.{n}.weight" for c, names in targets.items() for n in names]) \
            if self.spec.dora else None
        initial = init_lora_weights(self.spec, targets, shapes, cfg.seed, base)
        if cfg.init_lora_path:
            initial, message = start_from_file(cfg.init_lora_path, initial, self.module_index)
            self.notes.append(message)
        self.backend.add_lora(self.spec, targets, initial)
        self.embeddings = placeholder_embeddings(cfg.placeholder_tokens, cfg.initializer_tokens,
                                                 cfg.num_vectors_per_token, self.backend, self.tokenizer, cfg.seed) \
            if cfg.placeholder_tokens else []
        if self.embeddings:
            check_placeholders_used(cfg, self.dataset.captions)
            install_embeddings(self.backend, self.tokenizer, self.embeddings, trainable=True,
                               sources=["placeholder_tokens"] * len(self.embeddings))
        if cfg.gradient_checkpointing:
            self.backend.enable_gradient_checkpointing()
        self.optimizer_settings = OptimizerSettings.from_config(cfg)
        self.backend.configure_training(self.optimizer_settings)
        loss_options = LossOptions.from_config(cfg)
        self.inputs = self.data.inputs(self.backend, self.info, self.schedule, loss_options,
                                       dropout=bool(self.spec.dropout or self.spec.network_dropout))
        self.validation = ValidationLoss(self.data.held_out, self.tokenizer, self.backend, self.info, self.schedule,
                                         loss_options) if self.data.held_out else None
        self.plan = self._plan()
        self._stop_requested = False

    def _plan(self) -> RunPlan:
        cfg, micro = self.cfg, self.order.steps_per_epoch
        if cfg.max_train_steps:
            total = cfg.max_train_steps
        else:
            total = max(1, (cfg.epochs * micro) // cfg.gradient_accumulation_steps)
        ti_steps = (total if not cfg.use_lora else min(cfg.ti_steps, total)) if cfg.placeholder_tokens else 0
        return RunPlan(micro_steps_per_epoch=micro, accumulation=cfg.gradient_accumulation_steps, total_steps=total,
                       ti_steps=ti_steps)

    # --- data -------------------------------------------------------------------------------
    def micro_batch(self, micro_step: int) -> StepBatch:
        """The exact inputs of micro-step `micro_step` (0-based, counted over the whole run)."""
        return self.inputs(micro_step)

    def part_rates(self, lr: float) -> dict[str, float | None]:
        """The log's learning rates at a step whose rate is `lr`: the UNet LoRA's (`lr`; the text encoder's when only
        it trains) and the text encoder's (None when it is frozen)."""
        settings = self.optimizer_settings
        text = lr * settings.lr_scale("text_encoder") if self.cfg.lora_ft_text_encoder else None
        return {"lr": lr * settings.lr_scale("unet") if self.cfg.lora_ft_unet else text, "lr_text_encoder": text}

    def lr_at(self, step: int) -> float:
        """The LoRA's learning rate of 0-based optimizer step `step` (0 during the embeddings-only steps, after which
        the schedule runs over the remaining steps)."""
        cfg, ti = self.cfg, self.plan.ti_steps
        if step < ti:
            return 0.0
        return learning_rate(step - ti, self.plan.total_steps - ti, cfg.scheduler, cfg.start_learning_rate,
                             cfg.end_learning_rate, cfg.warmup_steps, cfg.decay_steps, cfg.milestones, cfg.decay_rate)

    def embeddings_lr_at(self, step: int) -> float:
        """The placeholder embeddings' learning rate: learning_rate_ti during the first ti_steps (every step when
        ti_steps is 0), then continue_inversion_lr (default learning_rate_ti) with continue_inversion, else 0."""
        cfg = self.cfg
        if not self.embeddings:
            return 0.0
        if step < self.plan.ti_steps or self.plan.ti_steps == 0:  # ti_steps 0: both train throughout
            return cfg.learning_rate_ti
        return (cfg.continue_inversion_lr or cfg.learning_rate_ti) if cfg.continue_inversion else 0.0

    def trained_embeddings(self) -> list[Embedding]:
        """The placeholder embeddings as trained so far."""
        rows, start, out = self.backend.token_rows(), 0, []
        for embedding in self.embeddings:
            out.append(Embedding(embedding.name, rows[start:start + len(embedding.vectors)].copy()))
            start += len(embedding.vectors)
        return out

    def save_embeddings(self, folder: Path, step: int) -> list[Path]:
        metadata = {"msd_lora.base_model": self.info.base_model, "msd_lora.step": str(step)}
        return write_run_embeddings(folder, self.trained_embeddings(), metadata)

    # --- checkpoints ------------------------------------------------------------------------
    @property
    def resume_path(self) -> Path:
        return self.output / "ckpt" / RESUME_NAME

    def _restore(self, log_message) -> tuple[int, int]:
        """(start step, skipped steps so far) from the resume state, or (0, 0)."""
        resume = self.cfg.resume
        if resume is False:
            return 0, 0
        path = self.resume_path if resume is True else Path(resume)
        if resume is True and not path.exists():
            log_message(f"no resume state at {path}; starting from step 0")
            return 0, 0
        state = load_resume(path)
        if state.step > self.plan.total_steps:
            raise ResumeError(f"{path} is at step {state.step}, past this run's {self.plan.total_steps} steps")
        try:
            self.backend.set_lora_weights(state.lora)
        except LoraMismatchError as err:
            raise ResumeError(f"{path} does not fit this run's LoRA: {err}") from err
        arrays = dict(state.arrays)
        rows = arrays.pop(ROWS_STATE, None)
        if (rows is None) != (not self.embeddings):
            raise ResumeError(f"{path} {'holds no' if rows is None else 'holds'} trained embeddings, and this run "
                              f"{'trains' if self.embeddings else 'trains none'}: resume it with the same "
                              f"placeholder_tokens")
        if rows is not None:
            if rows.shape != self.backend.token_rows().shape:
                raise ResumeError(f"{path}: its embeddings have shape {rows.shape}, this run's "
                                  f"{self.backend.token_rows().shape}: resume with the same placeholder_tokens and "
                                  f"num_vectors_per_token")
            self.backend.set_token_rows(rows)
        self.backend.load_training_state(arrays, state.scalars, source=str(path))
        log_message(f"resumed from {path} at step {state.step}")
        return state.step, int(state.scalars.get("skipped_steps", 0))

    def save_checkpoint(self, step: int, skipped: int) -> Path:
        lora_path = self.output / "ckpt" / f"lora-{step:06d}.safetensors"
        self.save_lora(lora_path, step)
        arrays, scalars = self.backend.training_state()
        if self.embeddings:
            arrays[ROWS_STATE] = self.backend.token_rows()
            self.save_embeddings(self.output / "ckpt" / f"embeddings-{step:06d}", step)
        save_resume(self.resume_path, ResumeState(step=step, lora=self.backend.lora_weights(), arrays=arrays,
                                                  scalars={**scalars, "skipped_steps": skipped}))
        return lora_path

    def save_lora(self, path: Path, step: int) -> Path:
        weights = self.backend.lora_weights(ema=self.cfg.use_ema)
        extra = {"msd_lora.backend": self.backend.name, "msd_lora.ema": str(self.cfg.use_ema),
                 "msd_lora.lora_type": self.cfg.lora_type, "msd_lora.use_rslora": str(self.cfg.use_rslora),
                 "msd_lora.prediction_type": self.schedule.prediction_type,
                 "msd_lora.zero_terminal_snr": str(self.schedule.zero_terminal_snr)}
        if self.cfg.init_lora_path:
            extra["msd_lora.init_lora"] = str(self.cfg.init_lora_path)
        if self.embeddings:
            extra["msd_lora.placeholder_tokens"] = " ".join(e.name for e in self.embeddings)
        bundled = bundle_tensors(self.trained_embeddings()) if self.cfg.save_embeddings_in_lora else None
        return write_lora(path, weights, base_model=self.info.base_model, step=step, extra=extra, embeddings=bundled)

    def _checkpoint_due(self, step: int) -> bool:
        interval = self.cfg.ckpt_save_interval
        if self.cfg.step_mode:
            return step % interval == 0
        return self._epoch_ends(step, interval)

    def _epoch_ends(self, step: int, every: int) -> bool:
        """True when optimizer step `step` completes an epoch whose number is a multiple of `every` (0: never)."""
        before, after = math.floor(self.plan.epoch_of(step - 1)), math.floor(self.plan.epoch_of(step))
        return every > 0 and after > before and after % every == 0

    def _samples_due(self, step: int) -> bool:
        every = self.cfg.sample_every_n_steps
        return (every > 0 and step % every == 0) or self._epoch_ends(step, self.cfg.sample_every_n_epochs)

    def _validation_due(self, step: int) -> bool:
        cfg = self.cfg
        if self.validation is None:
            return False
        if not (cfg.validate_every_n_steps or cfg.validate_every_n_epochs):
            return self._checkpoint_due(step) or step == self.plan.total_steps
        return (cfg.validate_every_n_steps > 0 and step % cfg.validate_every_n_steps == 0) or \
            self._epoch_ends(step, cfg.validate_every_n_epochs)

    # --- loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        with self.folder.claimed(), stop_after_the_step_on_ctrl_c(self._request_stop):
            messages = [f"replacing the previous run in {self.output} ({', '.join(self.folder.replaced)})"] \
                if self.folder.replaced else []
            write_config(self.cfg, self.output / "train_config.yaml")
            self.data.write_bucket_table(self.output / "buckets.json")
            messages += self.notes + [self.data.summary()]
            start, skipped = self._restore(messages.append)
            log = TrainLog(self.output, self.plan.total_steps, start, show_progress=self.show_progress)
            try:
                for text in messages:
                    log.message(text)
                for cache, (reused, computed) in self.inputs.fill_caches(self._progress).items():
                    log.message(f"{cache} cache: {reused} entries reused, {computed} computed"
                                + (f" ({self.inputs.caches.folder})" if self.inputs.caches.folder else " (in memory)"))
                done, skipped, loss = self._train(log, start, skipped)
                if done < self.plan.total_steps:
                    self._stop(log, done, start, skipped)
                lora_path, embedding_paths = None, []
                if self.cfg.use_lora:  # textual inversion alone writes no (untrained) LoRA
                    lora_path = self.save_lora(self.output / "lora.safetensors", self.plan.total_steps)
                if self.embeddings:
                    embedding_paths = self.save_embeddings(self.output / "embeddings", self.plan.total_steps)
                    log.message(f"embeddings {', '.join(e.name for e in self.embeddings)}: "
                                f"{embedding_paths[0].parent} (<name>.safetensors: A1111 / kohya; "
                                f"<name>.diffusers.safetensors: diffusers)")
                native = self.cfg.use_lora and self.backend.save_native_lora(
                    str(self.output / "lora_mindone.ckpt"), self.backend.lora_weights(ema=self.cfg.use_ema),
                    self.module_index)
                if native:
                    log.message(f"also saved in mindone's LoRA format: {native}")
            finally:
                log.close()
                self.inputs.close()
            self.write_validation_samples()
        return TrainResult(self.output, lora_path, self.plan.total_steps, skipped, loss, tuple(embedding_paths))

    def _train(self, log: TrainLog, start: int, skipped: int) -> tuple[int, int, float]:
        """Optimizer steps from `start` until the plan's end or a Ctrl-C: (steps done, skipped so far, last loss)."""
        loss, accumulation, done = float("nan"), self.plan.accumulation, start
        compiling = self.backend.compiles_graphs and start < self.plan.total_steps
        if compiling:
            shapes = len(self.dataset.buckets)
            if shapes == 1:
                once = "once per run"
            elif self.backend.dynamic_shapes:
                once = (f"once for all {shapes} bucket shapes: a dynamic-shape graph, whose steps run slower than "
                        f"static ones on CPU; bucket_graphs: per_shape compiles one static graph per shape")
            else:
                once = f"once per bucket shape: {shapes} shapes, each when first used"
            log.message(f"{self.backend.name}: compiling the training graph on the first step (about 30 s for the "
                        f"tiny model, minutes for SD-size models; {once})")
            log.bar.set_description("train (compiling)")
            began = time.time()
        for step in range(start, self.plan.total_steps):
            if self._stop_requested:
                break
            lr, lr_rows = self.lr_at(step), self.embeddings_lr_at(step)
            losses, parts = [], []
            for k in range(accumulation):
                result = self.backend.train_step(self.micro_batch(step * accumulation + k), lr,
                                                 update=k == accumulation - 1, accumulation=accumulation,
                                                 lr_rows=lr_rows)
                losses.append(result.loss)
                if isinstance(self.inputs, PairedInputs):
                    parts.append(self.inputs.split_losses(result.sample_losses))
            if compiling:
                log.bar.set_description("train")
                log.message(f"{self.backend.name}: graph compiled, first step took {time.time() - began:.0f} s")
                compiling = False
            loss = float(np.mean(losses))
            skipped += int(result.overflow)
            if result.overflow:
                log.message(f"step {step + 1}: gradients not finite, update skipped (loss scale "
                            f"{result.loss_scale:g}, {skipped} skipped so far)")
            done = step + 1
            validation = self.validation.loss() if self._validation_due(done) else None
            log.step({"step": done, "epoch": round(self.plan.epoch_of(done), 4), "loss": loss, **self.part_rates(lr),
                      "grad_norm": result.grad_norm, "loss_scale": result.loss_scale,
                      "overflow": int(result.overflow), "skipped_steps": skipped, "val_loss": validation,
                      **({"loss_instance": float(np.mean([p[0] for p in parts])),
                          "loss_prior": float(np.mean([p[1] for p in parts]))} if parts else {}),
                      **({"lr_embeddings": lr_rows} if self.embeddings else {})},
                     write=done % self.cfg.log_interval == 0 or done == self.plan.total_steps or validation is not None)
            if validation is not None:
                log.message(f"step {done}: validation loss {validation:.5f} ({self.validation.images} held-out images)")
            if self._checkpoint_due(done) or done == self.plan.total_steps:
                self.save_checkpoint(done, skipped)
                plot_losses(log.csv_path, self.output / "loss.png")
            if self._samples_due(done):
                log.message(f"step {done}: samples in {self.sample_during_training(done)}")
        return done, skipped, loss

    def _progress(self, what: str, total: int) -> Callable[[int], None]:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=what, unit="item", disable=not self.show_progress or total == 0, leave=False)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance

    def _request_stop(self) -> None:
        self._stop_requested = True

    def _stop(self, log: TrainLog, done: int, start: int, skipped: int) -> None:
        """After a Ctrl-C: a checkpoint at the last finished step, and how to go on."""
        if done > start and not (self._checkpoint_due(done) or done == self.plan.total_steps):
            self.save_checkpoint(done, skipped)
        where = f"checkpoint at step {done} in {self.resume_path.parent}" if done > 0 else "nothing to save yet"
        text = (f"stopped by Ctrl-C after step {done} of {self.plan.total_steps} ({where}); to continue, run the same "
                f"command with --resume True")
        log.message(text)
        raise TrainingInterrupted(text)

    def validation_options(self) -> SamplingOptions:
        return validation_options(self.cfg)

    def validation_prompts(self) -> list[str]:
        return list(self.cfg.validation_prompts) or list(dict.fromkeys(self.dataset.captions))[:2]

    def sample_during_training(self, step: int) -> Path:
        """The validation prompts sampled from the LoRA file of `step` (saved now if the step saved none), as
        `text_to_image.py --lora_ckpt_path <that file>` samples them, into samples/step-NNNNNN/."""
        path = self.output / "ckpt" / f"lora-{step:06d}.safetensors"
        if not path.exists():
            self.save_lora(path, step)
        folder = self.output / "samples" / f"step-{step:06d}"
        sample_from_file(self.pipeline, self.module_index, path, self.validation_prompts(), self.validation_options(),
                         folder)
        return folder

    def write_validation_samples(self) -> list[Path]:
        """A grid per validation prompt (default: the dataset's first two captions), with the trained LoRA."""
        prompts = self.validation_prompts()
        options = self.validation_options()
        if self.cfg.use_ema:
            self.backend.set_lora_weights(self.backend.lora_weights(ema=True))
        paths = []
        for i, prompt in enumerate(prompts):
            images = generate(self.pipeline, prompt, options.n_samples, options, i)
            path = self.output / "validation" / f"prompt{i:02d}.png"
            save_png(path, image_grid(images), upscale=max(1, 128 // self.cfg.image_size))
            paths.append(path)
        atomic_write_text(self.output / "validation" / "prompts.txt", "\n".join(prompts) + "\n")
        return paths


def check_placeholders_used(cfg: TrainConfig, captions: list[str]) -> None:
    """Every placeholder token must appear in some caption (or the templates put them there), or it never trains."""
    if cfg.use_template:
        return
    unused = [t for t in cfg.placeholder_tokens if not any(t in c for c in captions)]
    if unused:
        raise ConfigError(f"placeholder_tokens {unused} appear in no caption of {cfg.data_path} (e.g. "
                          f"'{captions[0][:60]}'), so their embeddings would never train: put them in the captions "
                          f"or instance_prompt (e.g. 'a photo of {unused[0]} dog'), or set use_template: object")


def training_schedule(cfg: TrainConfig, model_config: ModelConfig) -> NoiseSchedule:
    """The model's noise schedule with the config's prediction_type and zero_terminal_snr applied."""
    schedule = model_config.noise_schedule().with_prediction_type(cfg.prediction_type or model_config.prediction_type)
    if cfg.zero_terminal_snr:
        if schedule.prediction_type != "v_prediction":
            raise ConfigError(f"zero_terminal_snr needs v-prediction, and {model_config.path or 'the model'} predicts "
                              f"{schedule.prediction_type}: set prediction_type: v_prediction (the LoRA then learns "
                              f"to predict v)")
        schedule = schedule.with_zero_terminal_snr()
    return schedule


@contextmanager
def stop_after_the_step_on_ctrl_c(request_stop: Callable[[], None]) -> Iterator[None]:
    """While the block runs, a first Ctrl-C calls `request_stop` (the loop stops after the current step); a second
    one raises KeyboardInterrupt at once. Only in the main thread, where signal handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def first(signum, frame) -> None:
        request_stop()
        print("\nCtrl-C: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def train(cfg: TrainConfig, show_progress: bool = True) -> TrainResult:
    return Trainer(cfg, show_progress=show_progress).run()
