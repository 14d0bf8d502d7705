"""The PyTorch reference backend and the training loop on the embedded tiny model and dataset."""
from __future__ import annotations

import numpy as np
import pytest

from msd_lora.config import load_train_config
from msd_lora.errors import DatasetError
from msd_lora.eval.style import style_distance
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.errors import LoraSpecError
from msd_lora.models.pretrained import load_pretrained
from msd_lora.train import Trainer
from tests.conftest import REPO, tiny_args


def make_trainer(tmp_path, *extra: str) -> Trainer:
    return Trainer(load_train_config(tiny_args(tmp_path, *extra)), show_progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full run of configs/train/lora_tiny.yaml, with losses on fixed batches before and after."""
    trainer = make_trainer(tmp_path_factory.mktemp("tiny_run"))
    probes = [trainer.micro_batch(1000 + i) for i in range(8)]
    base_before = trainer.backend.base_weights()
    loss_before = [trainer.backend.eval_loss(b) for b in probes]
    result = trainer.run()
    loss_after = [trainer.backend.eval_loss(b) for b in probes]
    return trainer, result, base_before, loss_before, loss_after


def test_only_lora_weights_change(trained):
    trainer, _, base_before, _, _ = trained
    base_after = trainer.backend.base_weights()
    assert base_after.keys() == base_before.keys()
    assert all(np.array_equal(base_before[k], base_after[k]) for k in base_before)
    assert all(np.abs(layer.up).max() > 0 for layer in trainer.backend.lora_weights().values())


def test_loss_goes_down_on_fixed_batches(trained):
    _, _, _, before, after = trained
    assert np.mean(after) < 0.85 * np.mean(before), (before, after)


def test_saved_lora_round_trips(trained):
    trainer, result, *_ = trained
    loaded = read_lora(result.lora_path)
    live = trainer.backend.lora_weights()
    assert loaded.weights.keys() == live.keys() and loaded.step == result.steps
    for key, layer in live.items():
        np.testing.assert_array_equal(loaded.weights[key].up, layer.up)
        np.testing.assert_array_equal(loaded.weights[key].down, layer.down)
        assert loaded.weights[key].alpha == 8.0
    assert (result.output_path / "train_config.yaml").is_file()
    assert len(list((result.output_path / "validation").glob("*.png"))) == 2


def test_lora_samples_are_closer_to_the_target_style(trained, tiny_model):
    """Colour signature (mean R, G, B, saturation) of samples with and without the LoRA vs the training images."""
    from PIL import Image

    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.tokenizer import PromptTokenizer
    from msd_lora.sample import SamplingSettings, generate, merge_loras

    trainer, result, *_ = trained
    reference = [np.asarray(Image.open(p)) for p in trainer.dataset.image_paths]
    settings = SamplingSettings(steps=25, guidance_scale=7.5, height=32, width=32, seed=0)  # the demo's settings
    prompts = (REPO / "configs/prompts/tiny_sks.txt").read_text().splitlines()
    tokenizer = PromptTokenizer(tiny_model / "tokenizer")

    def distance(with_lora: bool) -> float:
        backend = TorchBackend(device="cpu")
        info = backend.load_model(load_pretrained(tiny_model), "epsilon")
        if with_lora:
            merge_loras(backend, [(read_lora(result.lora_path).weights, 1.0, "trained")])
        images = [im for i, p in enumerate(prompts)
                  for im in generate(backend, info, tokenizer, trainer.schedule, p, 4, settings, i)]
        return style_distance(images, reference)

    base, lora = distance(False), distance(True)
    assert lora < 0.75 * base, f"style distance to the training images: base {base:.1f}, with LoRA {lora:.1f}"


def test_interrupted_and_resumed_run_ends_with_identical_lora(tmp_path):
    args = ("--max_train_steps", "6", "--step_mode", "True", "--ckpt_save_interval", "2",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--warmup_steps", "2")
    straight = make_trainer(tmp_path / "straight", *args).run()

    crashing = make_trainer(tmp_path / "resumed", *args)
    real_step, calls = crashing.backend.train_step, []

    def dies_on_step_4(*a, **kw):  # a kill after the step-2 checkpoint, mid-way through the step-4 micro-batches
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    crashing.backend.train_step = dies_on_step_4
    with pytest.raises(KeyboardInterrupt):
        crashing.run()
    resumed = make_trainer(tmp_path / "resumed", *args, "--resume", "True").run()
    a, b = read_lora(straight.lora_path).weights, read_lora(resumed.lora_path).weights
    for key in a:
        np.testing.assert_array_equal(a[key].up, b[key].up)
        np.testing.assert_array_equal(a[key].down, b[key].down)
    rows = (tmp_path / "resumed" / "train_log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize("changed, message", [
    (("--lora_alpha", "8"), r"alpha 4 differs from the model's lora_alpha 8, .* set lora_alpha: 4"),
    (("--lora_rank", "8"), r"shape \(4, \d+\) does not fit the model's \(8, \d+\)"),
])
def test_resume_with_other_lora_settings_is_refused(tmp_path, changed, message):
    """Resuming under another alpha would silently rescale the learned update; another rank cannot fit."""
    from msd_lora.errors import ResumeError

    args = ("--max_train_steps", "2", "--ckpt_save_interval", "1", "--step_mode", "True", "--lora_rank", "4",
            "--lora_alpha", "4")
    make_trainer(tmp_path, *args).run()
    with pytest.raises(ResumeError, match="train_resume.safetensors does not fit this run's LoRA: .*" + message):
        make_trainer(tmp_path, *args, "--max_train_steps", "4", "--resume", "True", *changed).run()


def test_text_encoder_lora_trains_and_saves_both_components(tmp_path):
    trainer = make_trainer(tmp_path, "--max_train_steps", "2", "--lora_ft_text_encoder", "True")
    result = trainer.run()
    components = {k.split(".")[0] for k in read_lora(result.lora_path).weights}
    assert components == {"unet", "text_encoder"}


def test_rank_larger_than_a_layer_is_an_error(tmp_path):
    with pytest.raises(LoraSpecError, match=r"lora_rank 65 is larger than unet layer .*to_\w+ \(64x64\)"):
        make_trainer(tmp_path, "--lora_rank", "65")


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"no_such_folder"):
        make_trainer(tmp_path, "--data_path", str(tmp_path / "no_such_folder"))


def test_overflowing_gradients_skip_the_update(tmp_path):
    """A non-finite gradient (injected) must skip the update and be counted, never applied."""
    import torch

    trainer = make_trainer(tmp_path, "--max_train_steps", "3", "--log_interval", "1")
    backend = trainer.backend
    real_loss = backend._loss
    backend._loss = lambda batch: real_loss(batch) * torch.tensor(float("inf"))
    before = backend.lora_weights()
    result = trainer.run()
    assert result.skipped_steps == 3
    after = backend.lora_weights()
    assert all(np.array_equal(before[k].down, after[k].down) for k in before)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[-1].split(",")[6:8] == ["1", "3"]


def test_diffusers_load_lora_weights_matches_our_merge(tmp_path, tiny_model):
    """Our file in diffusers' loader, fused at a scale, gives the weights our numpy merge gives."""
    from diffusers import StableDiffusionPipeline

    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
    from msd_lora.sample import merge_loras

    ours = TorchBackend(device="cpu")
    ours.load_model(load_pretrained(tiny_model), "epsilon")
    spec = LoraSpec(rank=4, alpha=8.0, targets={"unet": ("to_q", "to_k", "to_v", "to_out.0"),
                                                "text_encoder": ("q_proj", "v_proj")})
    shapes = ours.linear_shapes()
    weights = init_lora_weights(spec, select_targets(spec, shapes), shapes, seed=3)
    rng = np.random.default_rng(0)
    for layer in weights.values():
        layer.up = rng.standard_normal(layer.up.shape).astype(np.float32) * 0.05
    path = write_lora(tmp_path / "lora.safetensors", weights)
    original = ours.base_weights()
    merge_loras(ours, [(read_lora(path).weights, 0.7, str(path))])

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    theirs = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    theirs.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    mine = ours.base_weights()
    touched = [k for k in mine if k.endswith(".weight") and k[: -len(".weight")] in weights]
    assert len(touched) == len(weights)
    assert all(not np.allclose(mine[k], original[k]) for k in touched)  # the merge did change them
    for name in mine:
        np.testing.assert_allclose(mine[name], theirs[name].numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_lora_for_another_model_names_keys_and_shapes(tmp_path, tiny_model):
    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.lora.core import LoraLayer
    from msd_lora.errors import LoraMismatchError
    from msd_lora.sample import merge_loras

    backend = TorchBackend(device="cpu")
    backend.load_model(load_pretrained(tiny_model), "epsilon")
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    alien = {name: LoraLayer(np.zeros((4, 320), np.float32), np.zeros((320, 4), np.float32), 4.0),
             "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k":
                 LoraLayer(np.zeros((4, 768), np.float32), np.zeros((1280, 4), np.float32), 4.0)}
    with pytest.raises(LoraMismatchError, match=r"(?s)sd15\.safetensors does not fit.*down_blocks\.3.*"
                                                r"to_q: LoRA gives 320x320.*model has 64x64"):
        merge_loras(backend, [(alien, 1.0, "sd15.safetensors")])
