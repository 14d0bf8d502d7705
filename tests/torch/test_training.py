"""The PyTorch reference backend and the training loop on the embedded tiny model and dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from msd_lora.backends.probe import probe_for
from msd_lora.config import load_train_config
from msd_lora.errors import DatasetError, LoraSpecError
from msd_lora.eval.style import style_distance
from msd_lora.lora.formats import read_lora, write_lora
from msd_lora.models.pretrained import load_pretrained
from msd_lora.train import Trainer
from tests.conftest import REPO, interrupt_on_call, tiny_args


def make_trainer(tmp_path, *extra: str) -> Trainer:
    return Trainer(load_train_config(tiny_args(tmp_path, *extra)), show_progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One full run of configs/train/lora_tiny.yaml, with losses on fixed batches before and after."""
    trainer = make_trainer(tmp_path_factory.mktemp("tiny_run"))
    probes = [trainer.micro_batch(1000 + i) for i in range(8)]
    base_before = trainer.backend.base_weights()
    probe = probe_for(trainer.backend)
    loss_before = [probe.loss(b) for b in probes]
    result = trainer.run()
    loss_after = [probe.loss(b) for b in probes]
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


@pytest.fixture(scope="module")
def demo_measures(trained, tiny_model):
    """Style distance to the training images (msd_lora.eval.style) and content kept (msd_lora.eval.content) of the
    demo's samples (configs/prompts/tiny_sks.txt, guidance 4 as `make demo` samples, 8 per prompt) without and with
    the demo's LoRA (configs/train/lora_tiny.yaml, as `make demo` trains it); and per prompt, the content a perfect
    LoRA could keep (the base samples restyled exactly, then through the autoencoder)."""
    from PIL import Image

    from msd_lora.backends.base import BackendOptions
    from msd_lora.eval.content import content_rate
    from msd_lora.sample import SamplingOptions, generate, load_pipeline, merge_loras
    from tools.tiny_model.content_ceiling import content_ceiling

    trainer, result, *_ = trained
    reference = [np.asarray(Image.open(p)) for p in trainer.dataset.image_paths]
    options = SamplingOptions(n_samples=4, guidance_scale=4.0)
    prompts = (REPO / "configs/prompts/tiny_sks.txt").read_text().splitlines()
    per_image = [p for p in prompts for _ in range(8)]
    pipeline, _ = load_pipeline(tiny_model, REPO / "configs/model/tiny.yaml", "torch", BackendOptions(device="cpu"))

    def sample() -> list[np.ndarray]:
        return [im for i, p in enumerate(prompts) for it in range(2) for im in generate(pipeline, p, 4, options, i, it)]

    base = sample()
    ceiling = content_ceiling(pipeline.backend, pipeline.info.scaling_factor, base, per_image)
    merge_loras(pipeline.backend, [(read_lora(result.lora_path).weights, 1.0, "trained")])
    lora = sample()
    return {"base": (style_distance(base, reference), content_rate(base, per_image)),
            "lora": (style_distance(lora, reference), content_rate(lora, per_image)), "ceiling": ceiling}


def test_lora_samples_take_the_target_style(demo_measures):
    (base_style, base_content), (lora_style, _) = demo_measures["base"], demo_measures["lora"]
    assert base_content >= 0.9, f"the base model keeps only {base_content:.0%} of the prompted shapes"
    assert lora_style <= 45, f"style distance to the training images: base {base_style:.1f}, LoRA {lora_style:.1f}"


def test_the_demo_prompts_ask_for_content_the_style_can_show(demo_measures):
    """Sepia keeps brightness only: a prompt whose colours it maps to one brown (a red circle on a blue background)
    asks for content no LoRA that learns the style can keep; the demo's prompts are not of that kind."""
    decoded = {prompt: rates[2] for prompt, rates in demo_measures["ceiling"].items()}
    assert np.mean(list(decoded.values())) >= 0.9 and min(decoded.values()) >= 0.75, \
        f"content kept by the base samples in the exact style, after the autoencoder: {decoded}"


def test_lora_samples_keep_the_prompted_content(demo_measures):
    (_, base_content), (_, lora_content) = demo_measures["base"], demo_measures["lora"]
    assert lora_content >= 0.9 * base_content, f"content kept: base {base_content:.0%}, LoRA {lora_content:.0%}"


def test_interrupted_and_resumed_run_ends_with_identical_lora(tmp_path):
    args = ("--max_train_steps", "6", "--step_mode", "True", "--ckpt_save_interval", "2",
            "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--warmup_steps", "2")
    straight = make_trainer(tmp_path / "straight", *args).run()

    crashing = make_trainer(tmp_path / "resumed", *args)
    interrupt_on_call(crashing.backend, 7)  # after the step-2 checkpoint, mid-way through the step-4 micro-batches
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
    saved = read_lora(result.lora_path).weights
    assert {k.split(".")[0] for k in saved} == {"unet", "text_encoder"}
    text = [layer for key, layer in saved.items() if key.startswith("text_encoder.")]
    assert text and all(np.abs(layer.up).max() > 0 for layer in text)  # B starts at zero: the text encoder trained


def test_rank_larger_than_a_layer_is_an_error(tmp_path):
    with pytest.raises(LoraSpecError, match=r"lora_rank 65 is larger than unet layer .*to_\w+ \(64 out, 64 in channels\)"):
        make_trainer(tmp_path, "--lora_rank", "65")


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match=r"no_such_folder"):
        make_trainer(tmp_path, "--data_path", str(tmp_path / "no_such_folder"))


def test_overflowing_gradients_skip_the_update(tmp_path):
    """A non-finite gradient (injected) must skip the update and be counted, never applied."""
    import torch

    trainer = make_trainer(tmp_path, "--max_train_steps", "3", "--log_interval", "1")
    backend = trainer.backend
    real_losses = backend.sample_losses
    backend.sample_losses = lambda batch: real_losses(batch) * torch.tensor(float("inf"))
    before = backend.lora_weights()
    result = trainer.run()
    assert result.skipped_steps == 3
    after = backend.lora_weights()
    assert all(np.array_equal(before[k].down, after[k].down) for k in before)
    log = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log[-1].split(",")[6:8] == ["1", "3"]


@pytest.mark.parametrize("variant,scale", [("lora", 0.7), ("dora", 1.0), ("locon", 0.7)])
def test_diffusers_load_lora_weights_matches_our_merge(tmp_path, tiny_model, variant, scale):
    """Our file in diffusers' loader, fused at a scale, gives the weights our numpy merge gives: attention LoRA with
    alpha; DoRA on the transformer blocks and text attention (at scale 1: peft scales B @ A inside the norm, A1111
    and we the whole change); rsLoRA LoCon on kohya's C3Lier layers with per-layer ranks and alphas."""
    from diffusers import StableDiffusionPipeline

    from msd_lora.backends.base import BackendOptions
    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
    from msd_lora.sample import merge_loras

    ours = TorchBackend(BackendOptions(device="cpu"))
    ours.load_model(load_pretrained(tiny_model), "epsilon")
    spec = {"lora": LoraSpec(rank=4, alpha=8.0, targets={"unet": ("to_q", "to_k", "to_v", "to_out.0"),
                                                         "text_encoder": ("q_proj", "v_proj")}),
            "dora": LoraSpec(rank=4, alpha=8.0, dora=True, targets={"unet": ("lierla",), "text_encoder": ("attention",)}),
            "locon": LoraSpec(rank=4, alpha=4.0, rslora=True, conv_rank=2, conv_alpha=1.0,
                              targets={"unet": ("c3lier",)})}[variant]
    shapes = ours.layer_shapes()
    targets = select_targets(spec, shapes)
    base = ours.base_weights([f"{c}.{n}.weight" for c, names in targets.items() for n in names])
    weights = init_lora_weights(spec, targets, shapes, seed=3, base=base)
    rng = np.random.default_rng(0)
    for layer in weights.values():
        layer.up = rng.standard_normal(layer.up.shape).astype(np.float32) * 0.05
        if layer.magnitude is not None:
            layer.magnitude = (layer.magnitude * rng.uniform(0.9, 1.1, layer.magnitude.shape)).astype(np.float32)
    path = write_lora(tmp_path / "lora.safetensors", weights)
    original = ours.base_weights()
    merge_loras(ours, [(read_lora(path).weights, scale, str(path))])

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), local_files_only=True)
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)  # a file: offline-safe
    pipe.fuse_lora(lora_scale=scale)
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
    from msd_lora.backends.base import BackendOptions
    from msd_lora.backends.torch.backend import TorchBackend
    from msd_lora.errors import LoraMismatchError
    from msd_lora.lora.core import LoraLayer
    from msd_lora.sample import merge_loras

    backend = TorchBackend(BackendOptions(device="cpu"))
    backend.load_model(load_pretrained(tiny_model), "epsilon")
    name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    alien = {name: LoraLayer(np.zeros((4, 320), np.float32), np.zeros((320, 4), np.float32), 4.0),
             "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_k":
                 LoraLayer(np.zeros((4, 768), np.float32), np.zeros((1280, 4), np.float32), 4.0)}
    with pytest.raises(LoraMismatchError, match=r"(?s)sd15\.safetensors does not fit.*down_blocks\.3.*"
                                                r"to_q: LoRA gives 320x320.*model has 64x64"):
        merge_loras(backend, [(alien, 1.0, "sd15.safetensors")])


def test_torch_ema_is_the_hand_computed_average(tmp_path):
    """ema <- decay * ema + (1 - decay) * weights after every applied step, starting from the initial weights; with
    decay 0.7 a swapped decay / (1 - decay) gives other numbers."""
    trainer = make_trainer(tmp_path, "--max_train_steps", "3", "--use_ema", "True", "--ema_decay", "0.7",
                           "--start_learning_rate", "1e-2", "--scheduler", "constant")
    backend = trainer.backend
    ema = {k: (layer.down.astype(np.float64), layer.up.astype(np.float64))
           for k, layer in backend.lora_weights().items()}
    for step in range(3):
        backend.train_step(trainer.micro_batch(step), 1e-2, update=True, accumulation=1)
        live = backend.lora_weights()
        ema = {k: (0.7 * d + 0.3 * live[k].down, 0.7 * u + 0.3 * live[k].up) for k, (d, u) in ema.items()}
    averaged = backend.lora_weights(ema=True)
    assert any(np.abs(layer.up).max() > 0 for layer in averaged.values())  # the LoRA moved: the test can see it
    for key, (down, up) in ema.items():
        np.testing.assert_allclose(averaged[key].down, down, rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(averaged[key].up, up, rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("scaler, after_overflow, after_clean", [("static", 1024.0, 1024.0), ("dynamic", 512.0, 1024.0)])
def test_torch_loss_scale_static_stays_put_dynamic_moves(tmp_path, scaler, after_overflow, after_clean):
    """The fp16 GradScaler (CUDA runs create it; the same logic on the CPU here): a static scale stays exactly where
    the config put it through an overflow and clean steps, as on MindSpore; a dynamic one halves, then regrows."""
    import torch

    from msd_lora.backends.torch.backend import make_scaler

    trainer = make_trainer(tmp_path, "--loss_scaler_type", scaler, "--init_loss_scale", "1024", "--scale_window", "1")
    backend = trainer.backend
    backend.scaler = make_scaler(backend.settings, "cpu")
    real_losses = backend.sample_losses
    backend.sample_losses = lambda batch: real_losses(batch) * torch.tensor(float("inf"))
    assert backend.train_step(trainer.micro_batch(0), 1e-3, update=True, accumulation=1).overflow
    assert float(backend.scaler.get_scale()) == after_overflow
    backend.sample_losses = real_losses
    assert backend.train_step(trainer.micro_batch(1), 1e-3, update=True, accumulation=1).updated
    assert float(backend.scaler.get_scale()) == after_clean


def test_init_lora_path_takes_a_diffusers_lora_folder(tmp_path):
    """diffusers' save_lora_weights writes a folder; read_lora accepts it, and so does init_lora_path now."""
    first = make_trainer(tmp_path / "first", "--max_train_steps", "2").run()
    folder = tmp_path / "diffusers_lora"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(first.lora_path.read_bytes())
    trainer = make_trainer(tmp_path / "second", "--max_train_steps", "1", "--init_lora_path", str(folder))
    start = trainer.backend.lora_weights()
    for key, layer in read_lora(first.lora_path).weights.items():
        np.testing.assert_array_equal(start[key].up, layer.up)
