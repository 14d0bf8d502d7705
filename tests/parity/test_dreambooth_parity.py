"""DreamBooth with prior preservation and pivotal tuning train the same LoRA and the same embeddings on both backends
(docs/parity.md, docs/dreambooth.md): one run of each backend covers both, 20 steps of textual inversion then LoRA
with the embeddings still training, every batch holding instance and class images. The token-embedding table's own
rows stay bit-identical on both. The trained embedding, written as an A1111 file, samples the same images through
text_to_image.py --embedding_path on both backends."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("mindspore")
pytest.importorskip("mindone")

import numpy as np

from msd_lora.config import load_train_config
from msd_lora.data.class_images import generate_class_images
from msd_lora.embeddings.files import write_a1111
from msd_lora.embeddings.tokens import TOKEN_TABLE
from msd_lora.eval.images import prompted_samples
from msd_lora.files.safetensors_file import read_safetensors
from msd_lora.lora.formats import write_lora
from msd_lora.sample import SamplingOptions, generate
from msd_lora.train import Trainer
from tests.conftest import REPO, TINY_MODEL, tiny_args
from tests.parity.test_backends_agree import DEVICES, assert_lora_close, max_relative_error, psnr

STEPS, TI_STEPS = 20, 10
TOLERANCE = 1e-3
PROMPT = "a <sks> circle on a black background"
SAMPLING = ("--sampler", "ddim", "--sampling_steps", "8", "--scale", "4", "--seed", "5", "--n_samples", "2")


def test_dreambooth_with_prior_and_pivotal_tuning_agree(tmp_path, measured):
    flags = ("--data_path", str(REPO / "msd_lora/assets/tiny_dreambooth"), "--instance_prompt",
             "a <sks> circle on a black background", "--with_prior_preservation", "True", "--class_data_dir",
             str(tmp_path / "classes"), "--class_prompt", "a circle on a black background", "--num_class_images", "4",
             "--validation_steps", "5", "--placeholder_tokens", "<sks>", "--initializer_tokens", "circle",
             "--num_vectors_per_token", "2", "--ti_steps", str(TI_STEPS), "--continue_inversion", "True",
             "--continue_inversion_lr", "1e-3", "--learning_rate_ti", "5e-3", "--max_train_steps", str(STEPS),
             "--warmup_steps", "2", "--optim_eps", "1e-6")
    cfg = load_train_config(tiny_args(tmp_path / "torch", *flags))
    generate_class_images(cfg, lambda what, total: lambda n: None)  # once, so both backends read the same files
    frozen = read_safetensors(TINY_MODEL / "text_encoder/model.safetensors")[0][
        "text_model.embeddings.token_embedding.weight"]
    results, trainers = {}, {}
    for backend in ("torch", "mindspore"):
        trainer = Trainer(load_train_config(tiny_args(tmp_path / backend, "--backend", backend, "--device",
                                                      DEVICES[backend], *flags)), show_progress=False)
        losses = []
        for step in range(STEPS):
            result = trainer.backend.train_step(trainer.micro_batch(step), trainer.lr_at(step), update=True,
                                                accumulation=1, lr_rows=trainer.embeddings_lr_at(step))
            losses.append(trainer.inputs.split_losses(result.sample_losses))
        table = trainer.backend.base_weights([TOKEN_TABLE])[TOKEN_TABLE]
        assert np.array_equal(table, frozen), f"{backend}: the frozen rows of the token-embedding table moved"
        results[backend] = (trainer.backend.lora_weights(), trainer.backend.token_rows(), np.asarray(losses))
        trainers[backend] = trainer
        circle = frozen[trainer.tokenizer.token_ids("circle")[0]]
    (torch_lora, torch_rows, torch_losses), (ms_lora, ms_rows, ms_losses) = results["torch"], results["mindspore"]
    assert not np.allclose(torch_rows[0], circle)  # the embeddings did train from their initializer
    measured("dreambooth + pivotal: instance and class losses, max relative difference",
             max_relative_error(ms_losses, torch_losses), TOLERANCE)
    assert max_relative_error(ms_losses, torch_losses) <= TOLERANCE
    error = measured("dreambooth + pivotal: embeddings after 20 steps, max relative difference",
                     max_relative_error(ms_rows, torch_rows), TOLERANCE)
    assert error <= TOLERANCE
    assert_lora_close(ms_lora, torch_lora, TOLERANCE, "dreambooth + pivotal: LoRA after 20 steps", measured)
    states = [t.backend.encode_text(t.tokenizer([PROMPT])) for t in trainers.values()]
    error = measured("dreambooth + pivotal: text encoder output with the trained embedding, max abs difference",
                     float(np.abs(states[1] - states[0]).max()), 1e-5)
    assert error <= 1e-5

    # the torch run's embedding and LoRA as files, sampled by text_to_image.py on each backend
    trained = trainers["torch"]
    embedding = write_a1111(tmp_path / "files/sks.safetensors", trained.trained_embeddings()[0])
    lora = write_lora(tmp_path / "files/lora.safetensors", torch_lora)
    images = {}
    for backend in ("torch", "mindspore"):
        out = subprocess.run([sys.executable, "text_to_image.py", "--backend", backend, "--device", DEVICES[backend],
                              "--prompt", PROMPT, *SAMPLING, "--embedding_path", str(embedding), "--lora_ckpt_path",
                              str(lora), "--output_path", str(tmp_path / f"samples_{backend}")],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0 and "embedding <sks> loaded" in out.stderr, out.stderr[-2000:]
        images[backend] = np.stack(prompted_samples(tmp_path / f"samples_{backend}")[0])
    value = measured("dreambooth + pivotal: text_to_image.py --embedding_path, torch vs MindSpore (PSNR dB)",
                     psnr(images["mindspore"], images["torch"]), 40, ">=")
    assert value >= 40
    # the same as the trainer's own samples with its live embedding and LoRA: the files hold what was trained
    options = SamplingOptions(sampler="ddim", steps=8, guidance_scale=4.0, height=32, width=32, seed=5, n_samples=2)
    assert psnr(images["torch"], generate(trained.pipeline, PROMPT, 2, options)) >= 40
