from pathlib import Path

import pytest
import yaml

from msd_lora.config import OPTIONS, REPO_ROOT, load_train_config, write_config
from msd_lora.errors import ConfigError


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def test_defaults_then_yaml_then_cli(tmp_path):
    cfg_file = write_yaml(tmp_path / "c.yaml", {"lora_rank": 8, "train_batch_size": 2, "epochs": 3})
    cfg = load_train_config(["--train_config", str(cfg_file), "--lora_rank", "16"])
    assert cfg.lora_rank == 16  # CLI beats yaml
    assert cfg.train_batch_size == 2  # yaml beats default
    assert cfg.weight_decay == OPTIONS["weight_decay"].default  # default kept
    assert cfg.lora_alpha == 16.0  # alpha follows rank when not given


def test_cli_without_yaml_and_typed_values():
    cfg = load_train_config(["--betas", "0.9,0.98", "--clip_grad", "True", "--start_learning_rate", "2e-4"])
    assert cfg.betas == [0.9, 0.98] and cfg.clip_grad is True and cfg.start_learning_rate == 2e-4


def test_unknown_yaml_key_names_file_and_suggests(tmp_path):
    cfg_file = write_yaml(tmp_path / "bad.yaml", {"lora_rnak": 4})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'lora_rnak'.*Did you mean 'lora_rank'"):
        load_train_config(["--train_config", str(cfg_file)])


def test_unknown_cli_flag_suggests():
    with pytest.raises(ConfigError, match=r"unknown flag '--learning_rate'.*start_learning_rate|end_learning_rate"):
        load_train_config(["--learning_rate", "1e-4"])


@pytest.mark.parametrize("key,value,message", [
    ("lora_rank", 0, r"'lora_rank' is 0; it must be >= 1"),
    ("lora_rank", -2, r"'lora_rank' is -2"),
    ("lora_rank", 2.5, r"'lora_rank' must be int"),
    ("scheduler", "cosine", r"choose one of \['constant', 'cosine_decay', 'linear_decay'\]"),
    ("betas", [0.9], r"'betas' must be two numbers"),
    ("use_lora", False, r"trains LoRAs only"),
    ("clip_grad", "maybe", r"'clip_grad' must be bool"),
])
def test_bad_values_are_named(tmp_path, key, value, message):
    cfg_file = write_yaml(tmp_path / "c.yaml", {key: value})
    with pytest.raises(ConfigError, match=message):
        load_train_config(["--train_config", str(cfg_file)])


def test_relative_paths_resolve_against_yaml_folder_then_repo(tmp_path):
    (tmp_path / "data").mkdir()
    cfg_file = write_yaml(tmp_path / "c.yaml", {"data_path": "data", "model_config": "configs/model/tiny.yaml",
                                                "output_path": "out"})
    cfg = load_train_config(["--train_config", str(cfg_file)])
    assert cfg.data_path == str(tmp_path / "data")  # found beside the yaml
    assert cfg.model_config == str(REPO_ROOT / "configs/model/tiny.yaml")  # found in the repo
    assert cfg.output_path == str(tmp_path / "out")  # new paths stay beside the yaml


def test_cli_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_train_config(["--output_path", "o"]).output_path == str(tmp_path / "o")


def test_merged_config_round_trips(tmp_path):
    cfg = load_train_config(["--lora_rank", "8", "--validation_prompts", "[a b, c d]"])
    write_config(cfg, tmp_path / "train_config.yaml")
    again = load_train_config(["--train_config", str(tmp_path / "train_config.yaml")])
    assert again.to_dict() == cfg.to_dict()
    assert cfg.validation_prompts == ["a b", "c d"]


@pytest.mark.parametrize("name", ["lora_v1.yaml", "lora_v2.yaml", "lora_tiny.yaml"])
def test_shipped_train_configs_are_valid(name):
    cfg = load_train_config(["--train_config", str(REPO_ROOT / "configs/train" / name)])
    assert Path(cfg.model_config).is_file()


def test_config_is_read_only():
    cfg = load_train_config([])
    with pytest.raises(AttributeError):
        cfg.lora_rank = 3
    assert cfg.replace(lora_rank=3).lora_rank == 3
