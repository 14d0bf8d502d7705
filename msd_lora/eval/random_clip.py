"""A randomly initialised CLIP of the real architecture (ViT-L/14's depths, patch size and resolution; reduced
widths), written as a Hugging Face folder both backends load: for tests and the offline `make eval` demo only.

The weights are drawn in numpy from the parameter list of transformers' CLIPModel (`clip_state_shapes`), so no
framework is needed to write them and both backends start from identical values; loading is strict in both, which
checks that list. The tokenizer is a CLIP BPE tokenizer folder (the embedded tiny model's by default).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from msd_lora.eval.weights import RANDOM_INIT_KEY
from msd_lora.tokenizer import TOKENIZER_FILES


def random_clip_config(tokenizer_dir: str | Path, width: int = 64, projection_dim: int = 64) -> dict:
    """ViT-L/14's structure (24 vision layers, 12 text layers, 224 px, patch 14, quick_gelu) at `width`."""
    vocab = json.loads((Path(tokenizer_dir) / "vocab.json").read_text(encoding="utf-8"))
    common = dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=max(1, width // 16),
                  hidden_act="quick_gelu", projection_dim=projection_dim)
    text = dict(common, vocab_size=len(vocab), num_hidden_layers=12, max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(common, num_hidden_layers=24, image_size=224, patch_size=14, num_channels=3)
    return {"model_type": "clip", "architectures": ["CLIPModel"], "text_config": text, "vision_config": vision,
            "projection_dim": projection_dim, "logit_scale_init_value": 2.6592}


def _encoder_shapes(prefix: str, layers: int, hidden: int, intermediate: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{prefix}.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"], shapes[f"{p}.self_attn.{proj}.bias"] = (hidden, hidden), (hidden,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}.{norm}.weight"], shapes[f"{p}.{norm}.bias"] = (hidden,), (hidden,)
        shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (intermediate, hidden), (intermediate,)
        shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (hidden, intermediate), (hidden,)
    return shapes


def clip_state_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers' CLIPModel parameters: name -> shape."""
    t, v, proj = config["text_config"], config["vision_config"], config["projection_dim"]
    th, vh = t["hidden_size"], v["hidden_size"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    shapes = {
        "text_model.embeddings.token_embedding.weight": (t["vocab_size"], th),
        "text_model.embeddings.position_embedding.weight": (t["max_position_embeddings"], th),
        **_encoder_shapes("text_model", t["num_hidden_layers"], th, t["intermediate_size"]),
        "text_model.final_layer_norm.weight": (th,), "text_model.final_layer_norm.bias": (th,),
        "vision_model.embeddings.class_embedding": (vh,),
        "vision_model.embeddings.patch_embedding.weight": (vh, v.get("num_channels", 3), v["patch_size"],
                                                           v["patch_size"]),
        "vision_model.embeddings.position_embedding.weight": (patches + 1, vh),
        "vision_model.pre_layrnorm.weight": (vh,), "vision_model.pre_layrnorm.bias": (vh,),
        **_encoder_shapes("vision_model", v["num_hidden_layers"], vh, v["intermediate_size"]),
        "vision_model.post_layernorm.weight": (vh,), "vision_model.post_layernorm.bias": (vh,),
        "visual_projection.weight": (proj, vh),
        "text_projection.weight": (proj, th),
        "logit_scale": (),
    }
    return shapes


def random_clip_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Normal(0, 0.02) matrices, embeddings and biases; LayerNorms at identity; CLIP's initial logit scale."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in clip_state_shapes(config).items():
        if name == "logit_scale":
            value = np.asarray(config["logit_scale_init_value"])
        elif "norm" in name:
            value = np.ones(shape) if name.endswith("weight") else np.zeros(shape)
        else:  # matrices, embeddings and biases
            value = rng.normal(0.0, 0.02, shape)
        state[name] = np.asarray(value, np.float32)
    return state


def write_random_clip(folder: str | Path, tokenizer_dir: str | Path, seed: int = 0, width: int = 64) -> Path:
    """A Hugging Face CLIP folder with random weights (marked random in the safetensors metadata)."""
    from transformers import CLIPImageProcessor

    from msd_lora.files.safetensors_file import write_safetensors

    folder, tokenizer_dir = Path(folder), Path(tokenizer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config = random_clip_config(tokenizer_dir, width)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(folder / "model.safetensors", random_clip_state(config, seed),
                      {"format": "pt", RANDOM_INIT_KEY: f"seed={seed}"})  # "pt": transformers loads it too
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    size = config["vision_config"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)
    return folder
