"""A pretrained Stable Diffusion base model as both backends take it: configs plus diffusers-named numpy weights.

    model = load_pretrained("msd_lora/assets/tiny_sd")          # diffusers folder
    model = load_pretrained("v1-5-pruned-emaonly.safetensors")  # LDM single file (.ckpt too), version detected
    model = load_pretrained("sd_v1.5-d0ab7146.ckpt")            # mindone (MindSpore) checkpoint
    model.configs["unet"]        # UNet2DConditionModel config (diffusers' keys)
    model.state["unet"]          # {"conv_in.weight": ndarray, ...} with diffusers' parameter names
    model.tokenizer_dir          # a folder transformers.CLIPTokenizer loads

Backends build their networks (diffusers/transformers on torch, mindone's ports on MindSpore) from
`configs` and fill them from `state`, so one file on disk initialises either backend identically.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msd_lora.errors import ModelError

if TYPE_CHECKING:
    from msd_lora.models.model_config import ModelConfig

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


def check_model_folder(path: str | Path) -> Path:
    """Return the folder if it has the diffusers SD layout, else raise with what is missing."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise ModelError(f"pretrained_model_path '{path}' does not exist; give a diffusers folder "
                         f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or a single-file "
                         f"checkpoint (.safetensors / .ckpt)")
    if not path.is_dir():
        raise ModelError(f"pretrained_model_path '{path}' is a file, not a diffusers folder")
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise ModelError(f"pretrained_model_path '{path}' is not a diffusers Stable Diffusion folder: "
                         f"missing {', '.join(s + '/' for s in missing)}")
    return path


NETWORKS = ("unet", "vae", "text_encoder")


@dataclass
class PretrainedModel:
    """Configs and weights of one SD base model, independent of any framework."""

    source: str  # the path it was read from
    configs: dict[str, dict]  # network -> diffusers / transformers config dict
    state: dict[str, dict[str, np.ndarray]]  # network -> diffusers-named weights
    tokenizer_dir: Path  # a folder CLIPTokenizer loads (vocab.json, merges.txt, tokenizer_config.json)
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. detected version
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # single-file tensors no network uses (kept on rewrite)

    def take_state(self, network: str) -> dict[str, np.ndarray]:
        """The network's weights, dropped from this object so a backend's copy is the only one kept."""
        return self.state.pop(network)


def _read_config(folder: Path, network: str) -> dict:
    path = folder / network / "config.json"
    if not path.is_file():
        raise ModelError(f"{path} is missing: every network folder of a diffusers model has a config.json")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def load_diffusers_folder(path: str | Path) -> PretrainedModel:
    """A diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/), safetensors weights only."""
    folder = check_model_folder(path)
    configs = {n: _read_config(folder, n) for n in NETWORKS}
    state = {n: read_component_state(folder, n) for n in NETWORKS}
    return PretrainedModel(source=str(folder), configs=configs, state=state, tokenizer_dir=folder / "tokenizer",
                           metadata={"format": "diffusers"})


def load_pretrained(path: str | Path, model_config: str | Path | ModelConfig | None = None,
                    use_ema: bool = False) -> PretrainedModel:
    """Read `pretrained_model_path` (diffusers folder, LDM or mindone single file) into configs + numpy weights."""
    return load_model(path, model_config, use_ema)[0]


def load_model(path: str | Path, model_config: str | Path | ModelConfig | None = None,
               use_ema: bool = False) -> tuple[PretrainedModel, ModelConfig]:
    """(PretrainedModel, ModelConfig) of any supported base model.

    `model_config` (a yaml path or ModelConfig; empty = detect) gives the schedule and prediction type, and for
    single files the architecture; without it a diffusers folder describes itself and a single file's
    version is detected from its weights. A yaml that contradicts the weights is an error that says how.
    `use_ema` takes the UNet's EMA weights of LDM files that carry both.
    """
    from msd_lora.models.model_config import ModelConfig, load_model_config, model_config_from_folder
    from msd_lora.models.versions import check_folder_fits

    cfg = model_config if isinstance(model_config, ModelConfig) or not model_config else load_model_config(model_config)
    path = Path(path)
    if path.is_file():
        from msd_lora.models.single_file import read_single_file

        return read_single_file(path, cfg or None, use_ema)
    model = load_diffusers_folder(path)
    if cfg:
        check_folder_fits(cfg, model.configs, str(path))
    else:
        cfg = model_config_from_folder(path, model.configs)
    model.metadata["version"] = cfg.version or model.metadata.get("version", "")
    return model, cfg


WEIGHT_FILES = {  # component -> file stems diffusers / transformers write
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def component_weight_files(folder: str | Path, component: str) -> list[Path]:
    """The safetensors file(s) of one component: single, fp16 variant, or sharded with an index."""
    sub = Path(folder) / component
    stem = WEIGHT_FILES[component]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (sub / name).is_file():
            return [sub / name]
    index = sub / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [sub / s for s in shards]
    pickles = sorted(p.name for p in sub.glob("*.bin"))
    hint = (f" It holds {', '.join(pickles)}: pickled weights are not loaded (they can run code); convert them to "
            f"safetensors with a tool you trust." if pickles else "")
    raise ModelError(f"{sub}: no {stem}.safetensors found.{hint}")


def read_component_state(folder: str | Path, component: str) -> dict[str, np.ndarray]:
    """A component's weights as diffusers/transformers-named numpy arrays (memory-mapped; fp16 files stay fp16)."""
    from msd_lora.files.safetensors_file import read_safetensors

    state: dict[str, np.ndarray] = {}
    for path in component_weight_files(folder, component):
        state.update(read_safetensors(path)[0])
    return state
