"""DreamBooth and pivotal tuning on the embedded tiny model (torch): the subject is learnt, prior preservation keeps
the class prompt near the base model, the embedding table's other rows never move, our embedding files load in
diffusers and others' in ours, a killed run resumes exactly, class-image generation continues where it stopped."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msd_lora.config import load_train_config
from msd_lora.data.class_images import generate_class_images
from msd_lora.embeddings.files import read_embeddings
from msd_lora.embeddings.tokens import TOKEN_TABLE
from msd_lora.errors import DatasetError, EmbeddingError
from msd_lora.eval.tiny_world import drawn_colour, shows_subject_colour
from msd_lora.files.safetensors_file import read_safetensors, write_safetensors
from msd_lora.sample import generate
from msd_lora.train import Trainer
from msd_lora.train_inputs import PriorData
from tests.conftest import REPO, TINY_MODEL, interrupt_on_call, tiny_args

SUBJECT = REPO / "msd_lora/assets/tiny_dreambooth"
DREAMBOOTH_CONFIG = REPO / "configs/train/dreambooth_tiny.yaml"  # docs/dreambooth.md's worked example
INSTANCE_PROMPT = "a sks circle on a black background"
CLASS_PROMPT = "a blue circle on a black background"  # the world's nearest class to a cyan circle
SAMPLES = 20


def no_progress(what, total):
    return lambda n: None


def dreambooth_args(output: Path, classes: Path, *extra: str) -> list[str]:
    return tiny_args(output, "--data_path", str(SUBJECT), "--instance_prompt", INSTANCE_PROMPT, "--class_prompt",
                     CLASS_PROMPT, "--class_data_dir", str(classes), "--validation_steps", "10", *extra)


@pytest.fixture(scope="module")
def class_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classes")
    cfg = load_train_config(dreambooth_args(folder / "unused", folder, "--num_class_images", "20",
                                            "--with_prior_preservation", "True"))
    assert generate_class_images(cfg, no_progress) == (0, 20)
    return folder


@pytest.fixture(scope="module")
def dreambooth_runs(tmp_path_factory) -> dict:
    """Seeded samples of the base model and of the shipped DreamBooth example's LoRA (200 steps), trained with and
    without prior preservation: with the token, and with the class prompt."""
    classes = tmp_path_factory.mktemp("example_classes")
    out = {}
    for name, prior in (("prior", "True"), ("plain", "False")):
        cfg = load_train_config(["--train_config", str(DREAMBOOTH_CONFIG), "--output_path",
                                 str(tmp_path_factory.mktemp(name)), "--class_data_dir", str(classes),
                                 "--with_prior_preservation", prior])
        assert (cfg.instance_prompt, cfg.class_prompt) == (INSTANCE_PROMPT, CLASS_PROMPT)
        trainer = Trainer(cfg, show_progress=False)
        trainer.write_validation_samples = lambda: []  # measured below instead
        trainer.run()
        options = dataclasses.replace(trainer.validation_options(), steps=20, guidance_scale=5.0)
        out[name] = {"token": generate(trainer.pipeline, INSTANCE_PROMPT, SAMPLES, options, 0),
                     "class": generate(trainer.pipeline, CLASS_PROMPT, SAMPLES, options, 1),
                     "log": (trainer.output / "train_log.csv").read_text()}
        trainer.backend.set_lora_enabled(False)
        out["base"] = generate(trainer.pipeline, CLASS_PROMPT, SAMPLES, options, 1)
    return out


def rate(images: np.ndarray) -> float:
    return float(np.mean([shows_subject_colour(img) for img in images]))


def test_dreambooth_learns_the_subject_for_its_token_only(dreambooth_runs):
    """The subject (a cyan circle, a colour pretraining never showed) appears in >= 80 % of seeded samples with the
    token and in <= 20 % with the class prompt, whose circles stay blue; the base model never draws it."""
    prior = dreambooth_runs["prior"]
    assert rate(dreambooth_runs["base"]) == 0.0
    assert rate(prior["token"]) >= 0.8
    assert rate(prior["class"]) <= 0.2
    assert np.mean([drawn_colour(img) == "blue" for img in prior["class"]]) >= 0.9


def test_prior_preservation_keeps_the_class_prompt_near_the_base_model(dreambooth_runs):
    """Distance: mean absolute pixel difference (0-255) between the class prompt's samples and the base model's
    from the same seeds. Measured on this machine: 6.9 with prior preservation, 20.3 without."""
    base = dreambooth_runs["base"].astype(np.float64)
    distance = {name: np.abs(dreambooth_runs[name]["class"] - base).mean() for name in ("prior", "plain")}
    assert distance["prior"] < 0.6 * distance["plain"], distance
    header, first = dreambooth_runs["prior"]["log"].splitlines()[:2]
    row = dict(zip(header.split(","), first.split(",")))  # loss = instance + prior_loss_weight x class, logged apart
    assert float(row["loss"]) == pytest.approx(float(row["loss_instance"]) + float(row["loss_prior"]), rel=1e-5)


def test_class_image_generation_continues_where_it_stopped(class_images, tmp_path):
    removed = {name: (class_images / name).read_bytes() for name in ("class-00005.png", "class-00017.png")}
    for name in removed:
        (class_images / name).unlink()  # as a kill before these two were written leaves the folder
    cfg = load_train_config(dreambooth_args(tmp_path, class_images, "--num_class_images", "20",
                                            "--with_prior_preservation", "True"))
    assert generate_class_images(cfg, no_progress) == (18, 2)
    assert all((class_images / name).read_bytes() == data for name, data in removed.items())


def test_class_images_of_another_prompt_are_refused(class_images, tmp_path):
    """The folder records the prompt and model its images came from; a run with another class prompt is refused
    before it trains on them, whether it would generate more or not."""
    assert json.loads((class_images / "class_images.json").read_text())["class_prompt"] == CLASS_PROMPT
    for extra in (("--num_class_images", "20"), ()):
        cfg = load_train_config(tiny_args(tmp_path, "--data_path", str(SUBJECT), "--instance_prompt", INSTANCE_PROMPT,
                                          "--class_prompt", "a red circle on a black background", "--class_data_dir",
                                          str(class_images), "--with_prior_preservation", "True", *extra))
        with pytest.raises(DatasetError, match="generated with class_prompt 'a blue circle on a black background', "
                                               "this run has 'a red circle on a black background'"):
            Trainer(cfg, show_progress=False)


def test_kohya_reg_folders_are_the_class_images(tmp_path):
    """kohya's reg_data_dir: N_class folders, captioned by their class words, repeated N times per epoch."""
    for name in ("2_blue circle", "1_circle"):
        (tmp_path / "reg" / name).mkdir(parents=True)
    for i, image in enumerate(sorted(SUBJECT.glob("*.png"))[:3]):
        shutil.copy(image, tmp_path / "reg" / ("2_blue circle" if i < 2 else "1_circle") / image.name)
    cfg = load_train_config(dreambooth_args(tmp_path / "o", tmp_path / "unused", "--class_data_dir", "",
                                            "--reg_data_dir", str(tmp_path / "reg")))
    prior = PriorData.from_config(cfg)
    assert cfg.with_prior_preservation and prior.dataset.listing.kind == "kohya"
    assert sorted(prior.dataset.captions) == ["blue circle", "blue circle", "circle"]
    assert prior.order.num_items == 5  # 2 x 2 + 1 x 1


PIVOTAL = ("--instance_prompt", "a <sks> circle on a black background", "--placeholder_tokens", "<sks>",
           "--initializer_tokens", "circle", "--num_vectors_per_token", "2", "--ti_steps", "8",
           "--continue_inversion", "True", "--learning_rate_ti", "5e-3", "--max_train_steps", "16",
           "--save_embeddings_in_lora", "True", "--sample_every_n_steps", "16", "--validation_images", "1",
           "--validation_prompts", "a <sks> circle on a black background", "--validation_steps", "4",
           "--step_mode", "True", "--ckpt_save_interval", "8")


@pytest.fixture(scope="module")
def pivotal(tmp_path_factory) -> Trainer:
    trainer = Trainer(load_train_config(tiny_args(tmp_path_factory.mktemp("pti"), "--data_path", str(SUBJECT),
                                                  *PIVOTAL)), show_progress=False)
    trainer.initial_rows = trainer.backend.token_rows()
    trainer.run()
    return trainer


def test_pivotal_tuning_trains_only_the_new_rows(pivotal):
    table, _ = read_safetensors(TINY_MODEL / "text_encoder/model.safetensors")
    frozen = table["text_model.embeddings.token_embedding.weight"]
    assert np.array_equal(pivotal.backend.base_weights([TOKEN_TABLE])[TOKEN_TABLE], frozen)  # bit-identical
    rows = pivotal.backend.token_rows()
    assert rows.shape == (2, frozen.shape[1]) and not np.allclose(rows, pivotal.initial_rows)
    assert np.array_equal(pivotal.initial_rows, frozen[[pivotal.tokenizer.token_ids("circle")[0]] * 2])
    log = (pivotal.output / "train_log.csv").read_text().splitlines()
    header = log[0].split(",")
    rates = [dict(zip(header, line.split(","))) for line in log[1:]]
    assert {float(r["lr"]) for r in rates[:8]} == {0.0} and min(float(r["lr"]) for r in rates[8:]) > 0
    assert {float(r["lr_embeddings"]) for r in rates} == {5e-3}  # continue_inversion keeps learning_rate_ti


def test_embedding_files_hold_the_trained_rows_in_every_layout(pivotal):
    rows = pivotal.backend.token_rows()
    for path in ("embeddings/sks.safetensors", "embeddings/sks.diffusers.safetensors", "lora.safetensors"):
        (embedding,) = read_embeddings(pivotal.output / path)
        assert embedding.name == "<sks>" and np.array_equal(embedding.vectors, rows), path
    assert "<sks>" in (pivotal.output / "samples/step-000016/prompts.txt").read_text()  # samples used the token


def test_diffusers_load_textual_inversion_gives_our_text_encoder_output(pivotal):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_MODEL), safety_checker=None)
    pipe.load_textual_inversion(str(pivotal.output / "embeddings/sks.diffusers.safetensors"))
    prompt = "a <sks> circle on a black background"
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0].numpy()
    ours = pivotal.backend.encode_text(pivotal.tokenizer([prompt]))
    assert np.abs(theirs - ours).max() <= 1e-5


def test_a_killed_pivotal_run_resumes_exactly(pivotal, tmp_path):
    cfg = load_train_config(tiny_args(tmp_path, "--data_path", str(SUBJECT), *PIVOTAL))
    first = Trainer(cfg, show_progress=False)
    interrupt_on_call(first.backend, 11)  # after the step-8 checkpoint, in the LoRA phase
    with pytest.raises(KeyboardInterrupt):
        first.run()
    resumed = Trainer(cfg.replace(resume=True), show_progress=False)
    resumed.run()
    assert np.array_equal(resumed.backend.token_rows(), pivotal.backend.token_rows())
    ours, theirs = resumed.backend.lora_weights(), pivotal.backend.lora_weights()
    assert all(np.array_equal(ours[k].up, theirs[k].up) for k in ours)


def test_embeddings_load_for_sampling_and_bad_ones_are_refused(pivotal, tmp_path):
    def sample(*flags):
        return subprocess.run([sys.executable, "text_to_image.py", "--prompt", "a <sks> circle", "--n_samples", "1",
                               "--sampling_steps", "2", "--output_path", str(tmp_path / "s"), "--overwrite", "True",
                               *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})

    ok = sample("--embedding_path", str(pivotal.output / "embeddings/sks.safetensors"))
    assert ok.returncode == 0 and "embedding <sks> loaded" in ok.stderr, ok.stderr[-1500:]
    write_safetensors(tmp_path / "sd2.safetensors", {"emb_params": np.ones((1, 1024), np.float32)})
    wide = sample("--embedding_path", str(tmp_path / "sd2.safetensors"))
    assert wide.returncode == 2 and "has vectors of width 1024 (a SD 2.x embedding)" in wide.stderr.strip()
    assert len(wide.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,message", [
    (("--placeholder_tokens", "circle", "--instance_prompt", "a circle"), "'circle' is already in the tokenizer"),
    (("--placeholder_tokens", "<c>", "--instance_prompt", "a <c>", "--initializer_tokens", "cyan"),
     "initializer_token 'cyan' is 3 tokens"),
    (("--placeholder_tokens", "<c>", "--instance_prompt", "a circle"), r"placeholder_tokens \['<c>'\] appear in no "
                                                                      "caption"),
])
def test_bad_placeholder_settings_are_refused(tmp_path, flags, message):
    with pytest.raises((EmbeddingError, Exception), match=message):
        Trainer(load_train_config(tiny_args(tmp_path, "--data_path", str(SUBJECT), *flags)), show_progress=False)


def test_mindone_dreambooth_config_trains_through_the_cli(tmp_path):
    """mindone's DreamBooth LoRA yaml with only its paths changed loads as it is; the run through the CLI adds the
    tiny model's architecture, size and rank, and fewer class images, as flags."""
    text = (REPO / "tests/fixtures/mindone/train_config_dreambooth_lora_v2.yaml").read_text()
    text = text.replace('"/path/to/data"', f'"{SUBJECT}"').replace('"/path/to/class_image"', f'"{tmp_path / "c"}"')
    text = text.replace('"/path/to/pretrained_model"', f'"{TINY_MODEL}"').replace(
        '"/path/to/save/output_data"', f'"{tmp_path / "o"}"')
    (tmp_path / "db.yaml").write_text(text)
    cfg = load_train_config(["--train_config", str(tmp_path / "db.yaml")])
    assert (cfg.data_path, cfg.with_prior_preservation, cfg.num_class_images, cfg.class_guidance_scale,
            cfg.lora_ft_text_encoder) == (str(SUBJECT), True, 200, 9.0, True)
    out = subprocess.run(
        [sys.executable, "train_text_to_image.py", "--train_config", str(tmp_path / "db.yaml"), "--model_config",
         "configs/model/tiny.yaml", "--image_size", "32", "--lora_rank", "4", "--num_class_images", "4",
         "--max_train_steps", "2", "--validation_steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(list((tmp_path / "c").glob("class-*.png"))) == 4 and (tmp_path / "o/lora.safetensors").is_file()


def test_mindone_textual_inversion_config_keys_load(tmp_path):
    text = (REPO / "tests/fixtures/mindone/train_config_textual_inversion_v1.yaml").read_text()
    text = text.replace('"datasets/cat_toy"', f'"{SUBJECT}"').replace('"/path/to/pretrained_model"', f'"{TINY_MODEL}"')
    (tmp_path / "ti.yaml").write_text(text.replace('"/path/to/save/output_data"', f'"{tmp_path / "o"}"'))
    cfg = load_train_config(["--train_config", str(tmp_path / "ti.yaml")])
    assert not cfg.use_lora  # mindone's textual-inversion yaml trains the embeddings alone, as mindone's script does
    assert load_train_config(["--train_config", str(tmp_path / "ti.yaml"), "--use_lora", "True"]).use_lora
    assert (cfg.placeholder_tokens, cfg.initializer_tokens, cfg.num_vectors_per_token, cfg.use_template,
            cfg.max_train_steps, cfg.scheduler) == (("<cat-toy>",), ("toy",), 3, "object", 3000, "multi_step_decay")
    assert cfg.start_learning_rate == pytest.approx(4e-4)  # scale_lr: 1e-4 x batch 1 x accumulation 4
    out = subprocess.run(
        [sys.executable, "train_text_to_image.py", "--train_config", str(tmp_path / "ti.yaml"), "--model_config",
         "configs/model/tiny.yaml", "--image_size", "32", "--max_steps", "3", "--validation_steps", "2",
         "--initializer_token", "circle"],  # the tiny tokenizer knows no "toy"
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"embedding: {tmp_path / 'o/embeddings/cat-toy.safetensors'}  (3 steps" in out.stdout
    assert not (tmp_path / "o/lora.safetensors").exists()  # textual inversion alone: no untrained LoRA file
    (embedding,) = read_embeddings(tmp_path / "o/embeddings/cat-toy.diffusers.safetensors")
    assert embedding.name == "<cat-toy>" and embedding.vectors.shape == (3, 64)
