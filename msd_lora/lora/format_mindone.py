"""mindone's SD LoRA checkpoints (MindSpore .ckpt of the trainable LoRA parameters).

    model.diffusion_model.<LDM cell>.to_q.lora_down.weight     A (r, in)
    model.diffusion_model.<LDM cell>.to_q.lora_up.weight       B (out, r)
    cond_stage_model.transformer.transformer_layer.resblocks.N.attn.attn.in_proj.lora_down.weight
                                                               text encoder: q, k, v fused (B is (3 d, r))
    lora_rank                                                  int scalar
No alpha: mindone applies `lora_scale * B @ A`, i.e. alpha = rank. Reading a fused in_proj LoRA gives q, k and
v LoRAs that share A; writing fuses them back (rank r when A is shared, else a rank 3r block LoRA, which is
the same update). Writing folds alpha/rank into B.
"""
from __future__ import annotations

import warnings

import numpy as np

from msd_lora.errors import LoraFormatError
from msd_lora.lora.core import LoraLayer, LoraWeights, split_module_key
from msd_lora.lora.format_diffusers import baked
from msd_lora.lora.metadata import most_common
from msd_lora.lora.module_index import ModuleIndex
from msd_lora.models.ldm import UNET

TEXT = "cond_stage_model.transformer.transformer_layer.resblocks."
TEXT_MODULES = {"attn.attn.out_proj": "self_attn.out_proj", "c_fc": "mlp.fc1", "c_proj": "mlp.fc2"}
SCALARS = ("lora_rank", "lora_alpha", "epoch_num", "cur_step", "loss_scale", "global_step")
QKV = ("q_proj", "k_proj", "v_proj")
MINDONE_LOADS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".attn.attn.in_proj", ".attn.attn.out_proj")


def is_mindone(keys) -> bool:
    return any(k.startswith(("model.diffusion_model.", "cond_stage_model.")) and
               k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def _text_module(cell: str) -> tuple[int, str] | None:
    """(layer, part) of a mindone text-encoder cell path."""
    if not cell.startswith(TEXT):
        return None
    layer, _, part = cell[len(TEXT):].partition(".")
    return (int(layer), part) if layer.isdigit() else None


def read_mindone(tensors: dict[str, np.ndarray], index: ModuleIndex, source: str) -> LoraWeights:
    unet_modules = {m: d for d, m in index.mindone_unet().items()}
    cells: dict[str, dict[str, np.ndarray]] = {}
    for name, value in tensors.items():
        if name in SCALARS:
            continue
        for part in ("lora_down", "lora_up"):
            if name.endswith(f".{part}.weight"):
                cells.setdefault(name[: -len(f".{part}.weight")], {})[part] = value
                break
        else:
            raise LoraFormatError(f"{source}: key {name!r} is not a mindone LoRA parameter (*.lora_down.weight / "
                                  f"*.lora_up.weight)")
    weights: LoraWeights = {}
    unresolved = []
    for cell, parts in sorted(cells.items()):
        if len(parts) != 2:
            raise LoraFormatError(f"{source}: {cell} has only {', '.join(parts)}")
        down, up = parts["lora_down"], parts["lora_up"]
        rank = float(down.shape[0])
        text = _text_module(cell)
        if cell.startswith(UNET) and cell[len(UNET):] in unet_modules:
            weights[f"unet.{unet_modules[cell[len(UNET):]]}"] = LoraLayer(down=down, up=up, alpha=rank)
        elif text and text[1] == "attn.attn.in_proj":
            if up.ndim != 2 or up.shape[0] % 3:
                raise LoraFormatError(f"{source}: {cell}.lora_up.weight has shape {tuple(up.shape)}; a fused q, k, v "
                                      f"in_proj LoRA needs 3 x width rows")
            for proj, block in zip(QKV, np.split(up, 3, axis=0)):
                module = f"text_encoder.text_model.encoder.layers.{text[0]}.self_attn.{proj}"
                weights[module] = LoraLayer(down=down, up=block, alpha=rank)
        elif text and text[1] in TEXT_MODULES:
            module = f"text_encoder.text_model.encoder.layers.{text[0]}.{TEXT_MODULES[text[1]]}"
            weights[module] = LoraLayer(down=down, up=up, alpha=rank)
        else:
            unresolved.append(cell)
    if unresolved:
        raise LoraFormatError(f"{source}: {len(unresolved)} mindone LoRA cells name no layer of this model, e.g. "
                              f"{', '.join(unresolved[:3])}\n  Likely cause: a LoRA for another SD version or "
                              f"UNet layout (pass the matching --base / model_config)")
    return weights


def _fuse_qkv(layers: list[LoraLayer | None], width: int) -> LoraLayer:
    """One in_proj LoRA whose update stacks the q, k, v updates (missing ones are zero)."""
    present = [layer for layer in layers if layer is not None]
    dtype = present[0].down.dtype
    if len(present) == 3 and all(np.array_equal(present[0].down, layer.down) for layer in present[1:]):
        return LoraLayer(down=present[0].down, up=np.concatenate([layer.up for layer in present]),
                         alpha=float(present[0].rank))
    ranks = [layer.rank if layer is not None else 0 for layer in layers]
    down = np.concatenate([layer.down for layer in present]).astype(dtype)
    up = np.zeros((3 * width, sum(ranks)), dtype)
    col = 0
    for i, layer in enumerate(layers):
        if layer is not None:
            up[i * width:(i + 1) * width, col:col + layer.rank] = layer.up
            col += layer.rank
    return LoraLayer(down=down, up=up, alpha=float(sum(ranks)))


def refuse_beyond_mindone(weights: LoraWeights) -> None:
    """mindone's LoRA has no place for a DoRA magnitude (dropping it would change the model): say so and where it can
    go instead. Convolution LoRAs (LoCon) are written, with the warning that mindone's loader skips them."""
    dora = [k for k, layer in weights.items() if layer.magnitude is not None]
    if dora:
        raise LoraFormatError(f"mindone's LoRA format cannot hold DoRA layers (a magnitude vector), e.g. {dora[0]} "
                              f"({len(dora)} layers): write it as diffusers/peft or kohya instead")


def write_mindone(weights: LoraWeights, index: ModuleIndex) -> dict[str, np.ndarray]:
    """mindone LoRA tensors (alpha folded into B) plus `lora_rank`."""
    refuse_beyond_mindone(weights)
    unet_cells = index.mindone_unet()
    out: dict[str, np.ndarray] = {}
    qkv: dict[int, list[LoraLayer | None]] = {}
    for key, layer in weights.items():
        component, module = split_module_key(key)
        layer = baked(layer)
        if component == "unet":
            if module not in unet_cells:
                raise LoraFormatError(f"{key}: no such UNet module in the SD 1.x/2.x layout, so it has no mindone name; "
                                      f"if the LoRA belongs to another model, pass that model with --base")
            cell = UNET + unet_cells[module]
        else:
            parts = module.split(".")  # text_model.encoder.layers.N.<part...>
            if len(parts) < 6 or parts[:3] != ["text_model", "encoder", "layers"]:
                raise LoraFormatError(f"{key}: mindone's text encoder has LoRA only on its transformer layers")
            number, part = int(parts[3]), ".".join(parts[4:])
            if part in (f"self_attn.{p}" for p in QKV):
                qkv.setdefault(number, [None, None, None])[QKV.index(parts[5])] = layer
                continue
            theirs = {v: k for k, v in TEXT_MODULES.items()}.get(part)
            if theirs is None:
                raise LoraFormatError(f"{key}: mindone's text encoder has no module for {part}")
            cell = f"{TEXT}{number}.{theirs}"
        out[f"{cell}.lora_down.weight"], out[f"{cell}.lora_up.weight"] = layer.down, layer.up
    for number, layers in sorted(qkv.items()):
        width = next(layer.up.shape[0] for layer in layers if layer is not None)
        fused = _fuse_qkv(layers, width)
        cell = f"{TEXT}{number}.attn.attn.in_proj"
        out[f"{cell}.lora_down.weight"], out[f"{cell}.lora_up.weight"] = fused.down, fused.up
    ranks = [v.shape[0] for k, v in out.items() if k.endswith(".lora_down.weight")]
    out["lora_rank"] = np.array(most_common(ranks) if ranks else 0, dtype=np.int64)
    _warn_unloadable(out, int(out["lora_rank"]))
    return out


def _warn_unloadable(out: dict[str, np.ndarray], rank: int) -> None:
    """mindone's loader injects LoRA only on attention projections, all of rank `lora_rank`: say what it skips."""
    cells = [k[: -len(".lora_down.weight")] for k in out if k.endswith(".lora_down.weight")]
    other_layer = [c for c in cells if not c.endswith(MINDONE_LOADS)]
    other_rank = [c for c in cells if c not in other_layer and out[f"{c}.lora_down.weight"].shape[0] != rank]
    reasons = []
    if other_layer:
        reasons.append(f"{len(other_layer)} layers are not attention projections (e.g. {', '.join(other_layer[:2])})")
    if other_rank:
        reasons.append(f"{len(other_rank)} have a rank other than lora_rank {rank}, e.g. a q/k/v LoRA without a "
                       f"shared A fused to rank 3r ({', '.join(other_rank[:2])})")
    if reasons:
        warnings.warn(f"mindone's own LoRA loader will not load all of this file: {'; '.join(reasons)}. msd-lora "
                      f"reads it back with the same update.", UserWarning, stacklevel=3)
