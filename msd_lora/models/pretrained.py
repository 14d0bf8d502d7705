"""Locate and check a pretrained Stable Diffusion folder (diffusers layout) before any backend loads it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer")


class PretrainedModelError(ValueError):
    """The pretrained model path is missing or not a Stable Diffusion folder."""


def check_model_folder(path: str | Path) -> Path:
    """Return the folder if it has the diffusers SD layout, else raise with what is missing."""
    path = Path(path)
    if not str(path) or not path.exists():
        raise PretrainedModelError(f"pretrained_model_path '{path}' does not exist; give a diffusers folder "
                                   f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/)")
    if not path.is_dir():
        raise PretrainedModelError(f"pretrained_model_path '{path}' is a file; single-file checkpoints are not "
                                   f"supported yet, give a diffusers folder")
    missing = [s for s in SUBFOLDERS if not (path / s).is_dir()]
    if missing:
        raise PretrainedModelError(f"pretrained_model_path '{path}' is not a diffusers Stable Diffusion folder: "
                                   f"missing {', '.join(s + '/' for s in missing)}")
    return path


class PromptTokenizer:
    """CLIP tokenizer of a model folder, returning fixed-length numpy ids both backends take."""

    def __init__(self, model_path: str | Path):
        from transformers import CLIPTokenizer

        self._tok = CLIPTokenizer.from_pretrained(str(Path(model_path) / "tokenizer"), local_files_only=True)
        self.max_length = int(self._tok.model_max_length)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        ids = self._tok(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                        return_tensors="np").input_ids
        return ids.astype(np.int64)


WEIGHT_FILES = {  # component -> file stems diffusers / transformers write
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def component_weight_files(folder: str | Path, component: str) -> list[Path]:
    """The safetensors file(s) of one component: single, fp16 variant, or sharded with an index."""
    import json

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
    raise PretrainedModelError(f"{sub}: no {stem}.safetensors found.{hint}")


def read_component_state(folder: str | Path, component: str) -> dict[str, np.ndarray]:
    """A component's weights as diffusers/transformers-named numpy arrays (fp16 files stay fp16)."""
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for path in component_weight_files(folder, component):
        state.update(load_file(str(path)))
    return state
