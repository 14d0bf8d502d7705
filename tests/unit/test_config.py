from pathlib import Path

import pytest
import yaml

from msd_lora.config import REPO_ROOT, TrainConfig, load_train_config, write_config
from msd_lora.errors import ConfigError
from msd_lora.options import fields_of


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_then_yaml_then_cli(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"lora_rank": 8, "train_batch_size": 2, "epochs": 3})
    cfg = load_train_config(["--train_config", str(cfg_file), "--lora_rank", "16"])
    assert cfg.lora_rank == 16  # CLI beats yaml
    assert cfg.train_batch_size == 2  # yaml beats default
    assert cfg.weight_decay == 1e-2  # default kept
    assert cfg.lora_alpha == 16.0  # alpha follows rank when not given


def test_cli_without_yaml_and_typed_values():
    cfg = load_train_config(["--betas", "0.9,0.98", "--clip_grad", "True", "--start_learning_rate", "2e-4"])
    assert cfg.betas == (0.9, 0.98) and cfg.clip_grad is True and cfg.start_learning_rate == 2e-4
    assert load_train_config(["--betas", "0.8", "--betas", "0.9"]).betas == (0.8, 0.9)
    assert load_train_config(["--betas", "[0.5, 0.6]"]).betas == (0.5, 0.6)


def test_the_config_is_a_typed_frozen_dataclass():
    cfg = load_train_config([])
    assert isinstance(cfg, TrainConfig)
    with pytest.raises(AttributeError):
        cfg.lora_rank = 3
    assert cfg.replace(lora_rank=3).lora_rank == 3
    with pytest.raises(ConfigError, match=r"replace\(\): 'lora_rank' is 0; it must be >= 1"):
        cfg.replace(lora_rank=0)
    info = fields_of(TrainConfig)
    assert info["data_path"].setting.path and not info["lora_rank"].setting.path
    assert info["lora_rank"].kind is int and info["validation_prompts"].is_list


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    cfg_file = write_yaml(tmp_path / "bad.yaml", {"lora_rnak": 4})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'lora_rnak'.*Did you mean 'lora_rank'"):
        load_train_config(["--train_config", str(cfg_file)])


def test_unknown_cli_flag_suggests():
    with pytest.raises(ConfigError, match=r"unknown flag '--start_lerning_rate'. Did you mean 'start_learning_rate'"):
        load_train_config(["--start_lerning_rate", "1e-4"])


@pytest.mark.parametrize("key,value,message", [
    ("lora_rank", 0, r"'lora_rank' is 0; it must be >= 1"),
    ("lora_rank", -2, r"'lora_rank' is -2"),
    ("lora_rank", 2.5, r"'lora_rank' must be int, got 2.5"),
    ("scheduler", "cosine", r"choose one of \['constant', 'cosine_decay', 'linear_decay', 'multi_step_decay'\]"),
    ("betas", [0.9], r"'betas' must be two numbers"),
    ("betas", ["a", "b"], r"'betas' must be list of float, got \['a', 'b'\]"),
    ("use_lora", False, r"trains LoRAs \(or, with placeholder_tokens, embeddings\) only"),
    ("clip_grad", "maybe", r"'clip_grad' must be bool"),
    # garbage a run used to accept and report as a success
    ("start_learning_rate", float("nan"), r"'start_learning_rate' must be float, got nan \(not a finite number\)"),
    ("end_learning_rate", float("inf"), r"'end_learning_rate' must be float, got inf"),
    ("ema_decay", 1.5, r"'ema_decay' is 1.5; it must be in \[0, 1\]"),
    ("lora_alpha", 0, r"'lora_alpha' is 0.0; it must be > 0"),
    ("lora_alpha", -4, r"'lora_alpha' is -4.0; it must be > 0"),
    ("validation_sampler", "foo", r"'validation_sampler' is 'foo'; choose one of \['ddim', 'dpm_solver_pp', 'euler'\]"),
    ("seed", -1, r"'seed' is -1; it must be >= 0"),
    ("validation_guidance_scale", float("nan"), r"'validation_guidance_scale' must be float"),
])
def test_bad_values_name_file_key_and_value(tmp_path, key, value, message):
    cfg_file = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError, match=r"c\.yaml: .*" + message):
        load_train_config(["--train_config", str(cfg_file)])


def test_bad_flags_name_the_command_line():
    with pytest.raises(ConfigError, match=r"command line: 'betas' must be list of float, got \['a,b'\]"):
        load_train_config(["--betas", "a,b"])
    with pytest.raises(ConfigError, match=r"command line: 'ema_decay' is 1.5"):
        load_train_config(["--ema_decay", "1.5"])


def test_list_flags_are_repeated_never_split_at_commas():
    """A prompt with a comma is one prompt: --validation_prompts used to split it in two."""
    cfg = load_train_config(["--validation_prompts", "a red circle, in sks style", "--validation_prompts", "b"])
    assert cfg.validation_prompts == ("a red circle, in sks style", "b")
    assert load_train_config(["--lora_target_modules", "to_q,to_v"]).lora_target_modules == ("to_q", "to_v")


def test_relative_paths_resolve_against_yaml_folder_then_repo(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "run" / "ckpt").mkdir(parents=True)
    cfg_file = write_yaml(tmp_path / "c.yaml", {"data_path": "data", "model_config": "configs/model/tiny.yaml",
                                                "output_path": "out", "resume": "run/ckpt/state.safetensors",
                                                "init_lora_path": "loras/a.safetensors"})
    cfg = load_train_config(["--train_config", str(cfg_file)])
    assert cfg.data_path == str(tmp_path / "data")  # found beside the yaml
    assert cfg.model_config == str(REPO_ROOT / "configs/model/tiny.yaml")  # found in the repo
    assert cfg.output_path == str(tmp_path / "out")  # new paths stay beside the yaml
    assert cfg.resume == str(tmp_path / "run/ckpt/state.safetensors")  # every path key the same way, resume too
    assert cfg.init_lora_path == str(tmp_path / "loras/a.safetensors")
    assert load_train_config(["--train_config", str(cfg_file), "--resume", "True"]).resume is True


def test_cli_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_train_config(["--output_path", "o"]).output_path == str(tmp_path / "o")
    assert load_train_config(["--resume", "r.safetensors"]).resume == str(tmp_path / "r.safetensors")


def test_merged_config_round_trips(tmp_path):
    cfg = load_train_config(["--lora_rank", "8", "--validation_prompts", "[a b, c d]", "--overwrite", "True"])
    write_config(cfg, tmp_path / "train_config.yaml")
    again = load_train_config(["--train_config", str(tmp_path / "train_config.yaml")])
    assert again == cfg.replace(overwrite=False)  # an action of that run: the saved config can be resumed
    assert cfg.validation_prompts == ("a b", "c d")
    assert load_train_config(["--train_config", str(tmp_path / "train_config.yaml"), "--resume", "True"]).resume


@pytest.mark.parametrize("name", ["lora_v1.yaml", "lora_v2.yaml", "lora_tiny.yaml"])
def test_shipped_train_configs_are_valid(name):
    cfg = load_train_config(["--train_config", str(REPO_ROOT / "configs/train" / name)])
    assert Path(cfg.model_config).is_file()


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ConfigError, match="'overwrite' and 'resume' exclude each other"):
        load_train_config(["--resume", "True", "--overwrite", "True"])


@pytest.mark.parametrize("flags,message", [
    (["--cache_latents", "True", "--random_crop", "True"], r"cache_latents needs the same crop.*random_crop"),
    (["--cache_text_embeddings", "True", "--lora_ft_text_encoder", "True"], r"needs a frozen text encoder"),
    (["--cache_text_embeddings", "True", "--shuffle_caption", "True"], r"cannot cache captions that shuffle_caption"),
    (["--cache_to_disk", "True"], r"cache_to_disk is on but nothing is cached"),
    (["--min_bucket_reso", "512", "--max_bucket_reso", "256"], r"min_bucket_reso 512 is above max_bucket_reso 256"),
    (["--num_workers", "2", "--dataloader_num_workers", "1"], r"'num_workers' and 'dataloader_num_workers' are the same"),
    (["--max_token_length", "100"], r"'max_token_length' is 100; choose one of \[75, 150, 225\]"),
])
def test_data_options_that_exclude_each_other(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(flags)


def test_mindone_key_names_are_aliases(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("num_workers: 3\nimage_filter_size: 200\n")
    cfg = load_train_config(["--train_config", str(path)])
    assert (cfg.dataloader_num_workers, cfg.min_image_size) == (3, 200)
    path.write_text("num_workers: 3\ndataloader_num_workers: 2\n")
    with pytest.raises(ConfigError, match=r"m\.yaml: 'num_workers' and 'dataloader_num_workers' are the same"):
        load_train_config(["--train_config", str(path)])
