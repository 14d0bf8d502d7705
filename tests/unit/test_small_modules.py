import math
import os

import pytest
from transformers import CLIPTokenizer

from msd_lora.files.atomic import atomic_write_text
from msd_lora.lr_schedule import learning_rate
from tools.tiny_model.tokenizer import learn_merges, write_clip_tokenizer


def test_tokenizer_makes_each_word_one_token(tmp_path):
    words = ["red", "green", "greenery", "background", "a", "an", "on"]
    write_clip_tokenizer(tmp_path, words)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tok("a green background on red").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "green</w>", "background</w>", "on</w>",
                                              "red</w>", "<|endoftext|>"]
    assert len(tok("zebra").input_ids) > 3  # unknown words still tokenize, byte by byte
    assert len(learn_merges(words)) == len(set(learn_merges(words)))


def test_learning_rate_schedules():
    kw = dict(total_steps=110, start=1.0, end=0.1, warmup_steps=10)
    assert learning_rate(0, scheduler="cosine_decay", **kw) == pytest.approx(0.1)
    assert learning_rate(9, scheduler="cosine_decay", **kw) == pytest.approx(1.0)
    assert learning_rate(60, scheduler="cosine_decay", **kw) == pytest.approx(0.55)
    assert learning_rate(110, scheduler="cosine_decay", **kw) == pytest.approx(0.1)
    assert learning_rate(60, scheduler="linear_decay", **kw) == pytest.approx(0.55)
    assert learning_rate(60, scheduler="constant", **kw) == 1.0
    assert learning_rate(35, scheduler="cosine_decay", decay_steps=50, **kw) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(tmp_path) == ["f.txt"]


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Not mkstemp's private 0600: files others read (models, LoRAs) get 0666 minus the umask, as open() does."""
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_resume_file_errors(tmp_path):
    import numpy as np

    from msd_lora.checkpoint import ResumeState, load_resume, save_resume
    from msd_lora.errors import ResumeError
    from msd_lora.lora.core import LoraLayer
    from msd_lora.lora.formats import write_lora

    lora = {"unet.a.to_q": LoraLayer(np.ones((2, 4), np.float32), np.zeros((4, 2), np.float32), 2.0)}
    save_resume(tmp_path / "r.safetensors", ResumeState(step=3, lora=lora, scalars={"loss_scale": 8.0}))
    state = load_resume(tmp_path / "r.safetensors")
    assert state.step == 3 and state.scalars == {"loss_scale": 8.0} and state.lora["unet.a.to_q"].alpha == 2.0
    write_lora(tmp_path / "l.safetensors", lora)
    with pytest.raises(ResumeError, match="is not an msd-lora resume file"):
        load_resume(tmp_path / "l.safetensors")
    with pytest.raises(ResumeError, match="resume file .*missing.safetensors does not exist"):
        load_resume(tmp_path / "missing.safetensors")


def test_prompts_file_one_prompt_per_line_and_its_errors(tmp_path):
    from msd_lora.data.prompts import read_prompts_file

    (tmp_path / "p.txt").write_text("  a red circle \n\n\na blue square\n", encoding="utf-8")
    assert read_prompts_file(tmp_path / "p.txt") == ["a red circle", "a blue square"]
    with pytest.raises(FileNotFoundError, match=r"--data_path prompts file .*nope.txt not found \(a .txt file"):
        read_prompts_file(tmp_path / "nope.txt", what="--data_path prompts file")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts file .*empty.txt holds no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
