"""The training loop's and the sampler's wiring, on a stub backend that records what it is handed.

The real backends are tested against diffusers / transformers elsewhere; here the question is whether the loop
hands them the right numbers: the learning rate of every step (against the schedule's formula written out by
hand), the images of every batch across epochs (against numpy's permutation, the documented rule), what Ctrl-C
does, and classifier-free guidance's arithmetic.
"""
from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest

from msd_lora.backends.base import Backend, BackendOptions, StepBatch, StepResult
from msd_lora.config import load_train_config
from msd_lora.lora.core import LoraLayer, to_tensors
from msd_lora.sample import Pipeline, SamplingOptions, generate, guided
from msd_lora.train import Trainer, TrainingInterrupted
from tests.conftest import tiny_args

LINEARS = {"unet": {"mid.attn.to_q": (8, 8), "mid.attn.to_v": (8, 8)}, "text_encoder": {"layers.0.q_proj": (8, 8)}}


class StubBackend(Backend):
    """Records every train_step's batch and lr; LoRA weights live in numpy; 'sampling' is plain arithmetic."""

    name = "stub"

    def __init__(self, on_step=None, compiles_graphs: bool = False):
        super().__init__(BackendOptions())
        self.calls: list[tuple[StepBatch, float, bool]] = []
        self.weights: dict[str, LoraLayer] = {}
        self.on_step, self.compiles_graphs = on_step, compiles_graphs
        self.decoded = None
        self.evaluated: list[StepBatch] = []
        self.lora_enabled = True

    def _build_networks(self, model) -> None:
        for network in ("unet", "vae", "text_encoder"):
            model.take_state(network)

    def layer_shapes(self):
        return LINEARS

    def _base_parameters(self):
        return {}

    def _read(self, param):
        return np.asarray(param)

    def _write(self, param, value):
        param[...] = value

    def _inject_lora(self, spec, targets, init):
        self.weights = {f"{c}.{n}": LoraLayer(np.zeros((spec.rank, 8), np.float32), np.zeros((8, spec.rank), np.float32),
                                              spec.alpha) for c, names in targets.items() for n in names}

    def _trainable_count(self) -> int:
        return len(to_tensors(self.weights))

    def lora_weights(self, ema: bool = False):
        return {k: LoraLayer(v.down.copy(), v.up.copy(), v.alpha) for k, v in self.weights.items()}

    def _write_lora_weights(self, weights):
        self.weights = {k: LoraLayer(v.down.copy(), v.up.copy(), v.alpha) for k, v in weights.items()}

    def configure_training(self, settings) -> None:
        self.settings = settings

    def _extend_token_table(self, rows, trainable):
        raise NotImplementedError

    def token_rows(self):
        return None

    def set_token_rows(self, rows):
        raise NotImplementedError

    def train_step(self, batch, lr, update, accumulation, lr_rows=0.0):
        self.calls.append((batch, lr, update))
        if self.on_step:
            self.on_step(len(self.calls))
        return StepResult(loss=1.0, updated=update, overflow=False, grad_norm=0.0 if update else None, loss_scale=1.0)

    def enable_gradient_checkpointing(self):
        self.checkpointing = True

    def evaluate_loss(self, batch):
        self.evaluated.append(batch)
        return 0.5

    def set_lora_enabled(self, enabled):
        self.lora_enabled = enabled

    def training_state(self):
        return {}, {}  # no optimizer: nothing to resume but the weights

    def _restore_training_state(self, state) -> None:
        pass

    def encode_moments(self, pixels):
        f = self.info.vae_scale_factor
        mean = np.repeat(pixels[:, :1, ::f, ::f], self.info.latent_channels, axis=1)
        return mean, np.full_like(mean, 0.1)

    def numpy(self, tensor):
        return np.asarray(tensor, np.float32)

    def encode_prompts(self, token_ids):
        return token_ids.astype(np.float32).mean(axis=1, keepdims=True)[:, :, None, None] / 1000.0

    def denoise(self, latents, t, contexts):
        return [0.1 * latents + context for context in contexts]

    def decode(self, latents):
        self.decoded = np.array(latents)
        return np.tanh(latents[:, :3])

    def tensor(self, array):
        return np.array(array)


def trainer(tmp_path, *extra: str, backend: StubBackend | None = None) -> Trainer:
    cfg = load_train_config(tiny_args(tmp_path, "--lora_ft_text_encoder", "True", "--validation_steps", "2",
                                      "--validation_prompts", "a red circle", *extra))
    return Trainer(cfg, backend=backend or StubBackend(), show_progress=False)


def test_every_step_gets_the_scheduled_learning_rate(tmp_path):
    """Warmup 3 then cosine from 1e-3 to 1e-5 over 10 optimizer steps of 2 micro-batches; the formula by hand."""
    run = trainer(tmp_path, "--max_train_steps", "10", "--gradient_accumulation_steps", "2", "--warmup_steps", "3",
                  "--scheduler", "cosine_decay", "--start_learning_rate", "1e-3", "--end_learning_rate", "1e-5")
    run.run()
    calls = run.backend.calls
    assert len(calls) == 20 and [update for _, _, update in calls] == [False, True] * 10

    def expected(k: int) -> float:
        if k < 3:
            return 1e-3 * (k + 1) / 3
        return 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (k - 3) / 7))

    for i, (_, lr, _) in enumerate(calls):
        assert lr == pytest.approx(expected(i // 2), rel=1e-12), f"micro-step {i} (optimizer step {i // 2})"


def test_batches_follow_each_epochs_own_permutation(tmp_path, tiny_data):
    """20 images, batches of 4: rng = default_rng([seed, e]) permutes the images, then the 5 batches; step b of epoch e
    holds perm[4k:4k+4] with k = the batch permutation's b-th entry."""
    run = trainer(tmp_path, "--max_train_steps", "15", "--train_batch_size", "4", "--seed", "7")
    run.run()
    n, dataset = len(run.dataset), run.dataset
    assert n == 20
    for step, (batch, _, _) in enumerate(run.backend.calls):
        epoch, index = divmod(step, n // 4)
        rng = np.random.default_rng([7, epoch])
        images, batches = rng.permutation(n), rng.permutation(n // 4)
        order = images[batches[index] * 4:(batches[index] + 1) * 4]
        want, _ = run.backend.encode_moments(np.stack([dataset.load(int(i))[0] for i in order]))
        np.testing.assert_array_equal(batch.latent_mean, want, err_msg=f"step {step} (epoch {epoch}, batch {index})")


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tmp_path, capsys):
    def interrupt(calls: int) -> None:
        if calls == 3:
            os.kill(os.getpid(), signal.SIGINT)  # arrives during the third step

    run = trainer(tmp_path, "--max_train_steps", "8", "--step_mode", "True", "--ckpt_save_interval", "100",
                  backend=StubBackend(on_step=interrupt))
    before = signal.getsignal(signal.SIGINT)  # Python's default handler; SIG_IGN when started in the background
    with pytest.raises(TrainingInterrupted, match=r"stopped by Ctrl-C after step 3 of 8 \(checkpoint at step 3 in "
                                                  r".*ckpt\); to continue, run the same command with --resume True"):
        run.run()
    assert len(run.backend.calls) == 3  # the step under way was finished, no new one began
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    from msd_lora.checkpoint import load_resume

    assert load_resume(tmp_path / "ckpt" / "train_resume.safetensors").step == 3
    resumed = trainer(tmp_path, "--max_train_steps", "8", "--step_mode", "True", "--ckpt_save_interval", "100",
                      "--resume", "True")
    resumed.run()
    assert len(resumed.backend.calls) == 5  # steps 4..8
    rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 9)]


def test_graph_compiling_backends_say_so_before_the_first_step(tmp_path, capsys):
    trainer(tmp_path, "--max_train_steps", "1", backend=StubBackend(compiles_graphs=True)).run()
    out = capsys.readouterr().out
    assert "stub: compiling the training graph on the first step" in out
    assert "stub: graph compiled, first step took" in out


def test_guidance_is_uncond_plus_scale_times_the_difference(tiny_model):
    """generate() hands the sampler uncond + s * (cond - uncond), the negative prompt as uncond: the same run done
    by hand with that arithmetic reaches the same latents; swapping the two or using (1 - s) would not."""
    from msd_lora.backends.base import ModelInfo
    from msd_lora.diffusion import samplers
    from msd_lora.diffusion.schedule import NoiseSchedule
    from msd_lora.lora.module_index import ModuleIndex
    from msd_lora.tokenizer import PromptTokenizer

    u, c = np.array([1.0, -2.0]), np.array([3.0, 5.0])
    assert np.array_equal(guided([u, c], 4.0), u + 4.0 * (c - u)) and np.array_equal(guided([c], 9.0), c)
    backend = StubBackend()
    schedule = NoiseSchedule.from_config()
    tokenizer = PromptTokenizer(tiny_model / "tokenizer")
    pipeline = Pipeline(backend, ModelInfo(4, 2, 1.0, "stub"), tokenizer, schedule, 8, ModuleIndex([], [], {}))
    options = SamplingOptions(sampler="ddim", steps=4, guidance_scale=6.0, negative_prompt="a blue square",
                              height=8, width=8, seed=3)
    generate(pipeline, "a red circle", 2, options)
    cond = backend.encode_prompts(tokenizer(["a red circle"] * 2))
    uncond = backend.encode_prompts(tokenizer(["a blue square"] * 2))
    start = np.random.default_rng([3, 0x1A7E, 0, 0]).standard_normal((2, 4, 4, 4)).astype(np.float32)
    by_hand = samplers.sample("ddim", schedule, lambda x, t: 0.1 * x + uncond + 6.0 * (cond - uncond), start, 4)
    np.testing.assert_allclose(backend.decoded, by_hand, rtol=1e-6)
