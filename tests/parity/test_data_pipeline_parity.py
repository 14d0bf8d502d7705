"""The data pipeline on both backends: aspect-ratio buckets, caption dropout, flips, long captions (225 tokens in
75-token chunks) and the latent and text caches give the same inputs and the same LoRA on torch and MindSpore.

One trainer per backend serves the module. The dataset has two bucket shapes, which MindSpore trains with one
dynamic-shape train graph (`bucket_graphs: auto`; docs/data.md); the LoRA dropouts ride along, since their masks
are sized by the layer's input inside that graph.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("mindone")

from msd_lora.backends.probe import probe_for
from msd_lora.config import load_train_config
from msd_lora.tokenizer import PromptTokenizer
from msd_lora.train import Trainer
from msd_lora.train_inputs import CacheSettings, TrainingInputs
from tests.conftest import TINY_MODEL, tiny_args
from tests.parity.test_backends_agree import DEVICES, lora_error, max_relative_error
from tests.torch.test_data_pipeline import kohya_copy

STEPS = 20
SIZES = [(32, 32), (48, 24), (32, 32), (48, 24), (32, 32), (48, 24)]  # two buckets: 32x32 and 40x24


def long_caption(tokens: int = 200) -> str:
    tokenizer = PromptTokenizer(TINY_MODEL / "tokenizer")
    words = [w for w in "a red circle on blue green square yellow".split() if tokenizer.token_counts([w]) == [1]]
    caption = " ".join(words[i % len(words)] for i in range(tokens))
    assert tokenizer.token_counts([caption]) == [tokens]
    return caption


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data_parity")
    data = kohya_copy(tmp / "data", SIZES)
    next((data / "3_sks style").glob("*.txt")).write_text(long_caption())
    trainers = []
    for backend in ("torch", "mindspore"):
        args = tiny_args(tmp / backend, "--backend", backend, "--device", DEVICES[backend], "--data_path", str(data),
                         "--train_batch_size", "2", "--enable_bucket", "True", "--min_bucket_reso", "16",
                         "--max_bucket_reso", "64", "--bucket_reso_steps", "8", "--flip", "True",
                         "--caption_dropout_rate", "0.2", "--max_token_length", "225", "--cache_latents", "True",
                         "--cache_text_embeddings", "True", "--start_learning_rate", "1e-3", "--warmup_steps", "2",
                         "--lora_dropout", "0.1", "--network_dropout", "0.1")
        trainers.append(Trainer(load_train_config(args), show_progress=False))
    return trainers


def test_two_buckets_and_the_same_order(pair):
    torch_t, ms_t = pair
    assert torch_t.dataset.buckets == [(32, 32), (40, 24)]  # 48x24 (2:1) is nearest 40x24 in the 32² table
    assert ms_t.backend.dynamic_shapes  # bucket_graphs auto: one dynamic-shape train graph for both buckets
    for step in range(STEPS):
        a, b = (t.inputs.batches.get(step) for t in pair)
        assert a.bucket == b.bucket and np.array_equal(a.items, b.items) and a.captions == b.captions
    assert any("" == c for s in range(STEPS) for c in torch_t.inputs.batches.get(s).captions)  # dropout happened


def test_long_caption_encodes_alike_and_untruncated(pair, measured):
    torch_t, ms_t = pair
    ids = torch_t.tokenizer([long_caption(), "a red circle"])  # the batch shape the run compiled
    assert ids.shape == (2, 231)
    states = [t.backend.encode_text(ids) for t in pair]
    assert states[0].shape[:2] == (2, 227)
    assert measured("text states, 200-token caption, max_token_length 225", max_relative_error(states[1], states[0]),
                    1e-4) <= 1e-4
    assert not any("longer than max_token_length" in n for n in torch_t.notes)


def test_cached_inputs_equal_uncached_on_mindspore(pair, measured):
    _, ms_t = pair
    uncached = TrainingInputs(ms_t.dataset, ms_t.order, ms_t.captions, ms_t.tokenizer, ms_t.backend, ms_t.info,
                              ms_t.schedule, ms_t.cfg.seed, caches=CacheSettings(), loss=ms_t.inputs.loss,
                              dropout=ms_t.inputs.dropout)
    probe = probe_for(ms_t.backend)
    worst, worst_loss = 0.0, 0.0
    for step in (0, 3, 7):
        cached, plain = ms_t.micro_batch(step), uncached(step)
        worst = max(worst, max_relative_error(cached.latent_mean, plain.latent_mean),
                    max_relative_error(cached.latent_std, plain.latent_std),
                    max_relative_error(cached.context, plain.context))
        assert np.array_equal(cached.noise, plain.noise)
        losses = probe.loss(cached), probe.loss(plain)
        worst_loss = max(worst_loss, abs(losses[0] - losses[1]) / abs(losses[1]))
    assert measured("MindSpore cached vs uncached step inputs", worst, 1e-5) <= 1e-5
    assert measured("MindSpore cached vs uncached loss (relative)", worst_loss, 1e-5) <= 1e-5


def test_loras_after_twenty_bucketed_cached_steps_agree(pair, measured):
    for t in pair:
        for step in range(STEPS):
            t.backend.train_step(t.micro_batch(step), t.lr_at(step), update=True, accumulation=1)
    error = lora_error(pair[1].backend.lora_weights(), pair[0].backend.lora_weights())
    assert measured("LoRA after 20 steps, buckets + caption dropout + caches + 225 tokens + LoRA dropouts", error, 1e-3) <= 1e-3
