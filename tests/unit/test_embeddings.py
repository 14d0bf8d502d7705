"""Embedding files of other tools, the placeholder tokens, lora_pti's norm decay, class-image plans and the
DreamBooth / pivotal-tuning config checks."""
from __future__ import annotations

import numpy as np
import pytest

from msd_lora.config import load_train_config
from msd_lora.data.class_images import RECORD, check_generation_record, class_image_plan
from msd_lora.embeddings.files import (
    bundle_tensors,
    bundled_embeddings,
    read_embeddings,
    split_bundled,
    write_a1111,
    write_diffusers,
)
from msd_lora.embeddings.tokens import Embedding, check_width, decay_norms, initial_vectors
from msd_lora.errors import ConfigError, DatasetError, EmbeddingError
from msd_lora.files.safetensors_file import write_safetensors
from msd_lora.lr_schedule import learning_rate
from msd_lora.tokenizer import PromptTokenizer
from tests.conftest import TINY_MODEL, tiny_args

RNG = np.random.default_rng(0)


def test_a1111_file_written_by_hand_reads_with_the_file_name_as_token(tmp_path):
    vectors = RNG.standard_normal((3, 64)).astype(np.float32)
    write_safetensors(tmp_path / "cyan-thing.safetensors", {"emb_params": vectors})  # kohya's layout, no metadata
    (embedding,) = read_embeddings(tmp_path / "cyan-thing.safetensors")
    assert embedding.name == "cyan-thing" and np.array_equal(embedding.vectors, vectors)
    assert embedding.token_names == ["cyan-thing", "cyan-thing_1", "cyan-thing_2"]
    (renamed,) = read_embeddings(tmp_path / "cyan-thing.safetensors", token="<c>")
    assert renamed.name == "<c>"


def test_our_files_round_trip_in_each_layout(tmp_path):
    embedding = Embedding("<sks>", RNG.standard_normal((2, 64)).astype(np.float32))
    write_a1111(tmp_path / "sks.safetensors", embedding)
    write_diffusers(tmp_path / "sks.diffusers.safetensors", embedding)
    for name in ("sks.safetensors", "sks.diffusers.safetensors"):
        (back,) = read_embeddings(tmp_path / name)
        assert back.name == "<sks>" and np.array_equal(back.vectors, embedding.vectors)
    tensors = {"unet.x.lora_A.weight": np.ones((2, 2), np.float32), **bundle_tensors([embedding])}
    lora, bundled = split_bundled(tensors)
    assert list(lora) == ["unet.x.lora_A.weight"] and list(bundled) == ["bundle_emb.<sks>.string_to_param.*"]
    assert np.array_equal(bundled_embeddings(tensors)[0].vectors, embedding.vectors)


def test_a_single_vector_diffusers_embedding_is_one_row(tmp_path):
    write_safetensors(tmp_path / "learned_embeds.safetensors", {"<cat-toy>": np.ones(64, np.float32)})
    (embedding,) = read_embeddings(tmp_path / "learned_embeds.safetensors")
    assert embedding.name == "<cat-toy>" and embedding.vectors.shape == (1, 64)


def test_embedding_files_others_cannot_use_are_refused(tmp_path):
    write_safetensors(tmp_path / "xl.safetensors", {"clip_l": np.ones((1, 768), np.float32),
                                                    "clip_g": np.ones((1, 1280), np.float32)})
    with pytest.raises(EmbeddingError, match="SDXL embedding"):
        read_embeddings(tmp_path / "xl.safetensors")
    write_safetensors(tmp_path / "lora.safetensors", {"unet.a.lora_A.weight": np.ones((2, 2), np.float32)})
    with pytest.raises(EmbeddingError, match="LoRA file without bundled embeddings"):
        read_embeddings(tmp_path / "lora.safetensors")


def test_an_sd2_embedding_does_not_fit_an_sd1_text_encoder():
    with pytest.raises(EmbeddingError, match=r"width 1024 \(a SD 2.x embedding\).*width 768"):
        check_width(Embedding("<x>", np.ones((1, 1024), np.float32)), 768, "x.safetensors")


def test_norm_decay_is_lora_ptis_rule():
    rows = RNG.standard_normal((3, 8)).astype(np.float32)
    strength = 0.3
    out = decay_norms(rows, strength)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    expected = rows / norms * (norms + strength * (0.4 - norms))  # F.normalize(W) * (pre + lambda (0.4 - pre))
    assert np.allclose(out, expected, rtol=1e-6)
    assert np.array_equal(decay_norms(rows, 0.0), rows)  # no decay: bit-identical


def test_initializers():
    table = RNG.standard_normal((10, 4)).astype(np.float32)
    assert np.array_equal(initial_vectors("toy", 2, table, [7], 0), table[[7, 7]])
    assert not initial_vectors("<zero>", 1, table, None, 0).any()
    assert np.std(initial_vectors("<rand-0.5>", 50, table, None, 0)) == pytest.approx(0.5, rel=0.15)
    with pytest.raises(EmbeddingError, match="initializer_token 'cyan' is 3 tokens.*exactly one"):
        initial_vectors("cyan", 1, table, [66, 88, 512], 0)


def test_placeholders_expand_to_their_vector_tokens():
    tokenizer = PromptTokenizer(TINY_MODEL / "tokenizer")
    rows = tokenizer.add_embedding("<sks>", ["<sks>", "<sks>_1"], 602)
    assert rows == [602, 603]
    ids = tokenizer(["a <sks> circle", "a <sks>, circle"])
    assert list(ids[0][1:5]) == [tokenizer.token_ids("a")[0], 602, 603, tokenizer.token_ids("circle")[0]]
    assert list(ids[1][2:4]) == [602, 603]
    with pytest.raises(EmbeddingError, match="'circle' is already in the tokenizer's vocabulary"):
        tokenizer.add_embedding("circle", ["circle"], 604)


def test_class_image_plan_resumes_where_it_stopped(tmp_path):
    assert class_image_plan(tmp_path / "none", 3) == [0, 1, 2]
    for name in ("mine.jpg", "class-00001.png"):
        (tmp_path / name).write_bytes(b"x")
    assert class_image_plan(tmp_path, 4) == [0, 2]  # one of the user's, class-1 made before a kill
    (tmp_path / "2_dog").mkdir()
    with pytest.raises(DatasetError, match="kohya N_class folders"):
        class_image_plan(tmp_path, 4)


def test_a_broken_class_image_record_is_refused(tmp_path):
    record = {"class_prompt": "a dog", "pretrained_model_path": "/m"}
    check_generation_record(tmp_path, record)  # no record yet: nothing to check
    (tmp_path / RECORD).write_text("{not json")
    with pytest.raises(DatasetError, match=f"{RECORD} is not readable JSON.*delete it together with the class-"):
        check_generation_record(tmp_path, record)


def test_multi_step_decay_is_mindones_schedule():
    rates = [learning_rate(s, 10, "multi_step_decay", 1.0, 0.0, milestones=(2, 5), decay_rate=0.5) for s in range(7)]
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("flags,message", [
    (("--num_class_images", "10", "--with_prior_preservation", "True", "--class_data_dir", "c"),
     "num_class_images 10 asks for class images to be generated, but class_prompt is empty"),
    (("--with_prior_preservation", "True"), "with_prior_preservation needs class_data_dir"),
    (("--reg_data_dir", "r", "--class_data_dir", "c"), "reg_data_dir and class_data_dir both"),
    (("--placeholder_tokens", "<a> <a>", "--ti_steps", "2"), "repeat a token"),
    (("--placeholder_tokens", "<a> <b> <c>", "--initializer_tokens", "x y", "--ti_steps", "2"),
     "2 initializer_tokens for 3 placeholder_tokens"),
    (("--placeholder_tokens", "<a>", "--ti_steps", "2", "--optim", "prodigy"), "optim is prodigy"),
])
def test_dreambooth_and_pivotal_tuning_config_errors(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(tiny_args(tmp_path, *flags))


def test_kohya_reg_data_dir_turns_prior_preservation_on(tmp_path):
    cfg = load_train_config(tiny_args(tmp_path, "--reg_data_dir", str(tmp_path / "reg")))
    assert cfg.with_prior_preservation and cfg.class_data_dir == str(tmp_path / "reg")
    tokens = load_train_config(tiny_args(tmp_path, "--placeholder_tokens", "<s1>|<s2>", "--ti_steps", "3"))
    assert tokens.placeholder_tokens == ("<s1>", "<s2>")
