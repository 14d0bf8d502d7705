"""Every parameter name of the SD networks in diffusers' and in the original LDM naming, from the config alone.

    pairs = unet_names(config)     # [(diffusers name, LDM name), ...] in network order
    pairs = vae_names(config)
    names = text_encoder_names(num_layers)   # transformers CLIPTextModel names

The pairs are the one source for LDM <-> diffusers conversion, for the key inventory a LoRA's layer names
are resolved against, and (tests check it) they equal the real diffusers / transformers networks' state
dict keys. Only the SD 1.x / 2.x structure is described; anything else is refused with the feature named.
"""
from __future__ import annotations

from typing import Any

from msd_lora.errors import UnsupportedArchitectureError

Pairs = list[tuple[str, str]]

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
UNSUPPORTED_UNET_KEYS = {  # config key -> value every SD 1.x/2.x UNet has
    "class_embed_type": None, "addition_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "time_cond_proj_dim": None, "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_type": "default", "dual_cross_attention": False,
    "class_embeddings_concat": False, "projection_class_embeddings_input_dim": None,
}


def _wb(d: str, l: str) -> Pairs:
    return [(f"{d}.weight", f"{l}.weight"), (f"{d}.bias", f"{l}.bias")]


def _unet_resnet(d: str, l: str, shortcut: bool) -> Pairs:
    pairs = (_wb(f"{d}.norm1", f"{l}.in_layers.0") + _wb(f"{d}.conv1", f"{l}.in_layers.2")
             + _wb(f"{d}.time_emb_proj", f"{l}.emb_layers.1") + _wb(f"{d}.norm2", f"{l}.out_layers.0")
             + _wb(f"{d}.conv2", f"{l}.out_layers.3"))
    return pairs + (_wb(f"{d}.conv_shortcut", f"{l}.skip_connection") if shortcut else [])


def _transformer(d: str, l: str, depth: int) -> Pairs:
    pairs = _wb(f"{d}.norm", f"{l}.norm") + _wb(f"{d}.proj_in", f"{l}.proj_in")
    for k in range(depth):
        block = f"transformer_blocks.{k}"
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v"):
                pairs.append((f"{d}.{block}.{attn}.{proj}.weight", f"{l}.{block}.{attn}.{proj}.weight"))
            pairs += _wb(f"{d}.{block}.{attn}.to_out.0", f"{l}.{block}.{attn}.to_out.0")
        for part in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2"):
            pairs += _wb(f"{d}.{block}.{part}", f"{l}.{block}.{part}")
    return pairs + _wb(f"{d}.proj_out", f"{l}.proj_out")


def _per_block(value: Any, n: int, name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise UnsupportedArchitectureError(f"UNet config: {name} has {len(values)} entries for {n} blocks")
    return [int(v) for v in values]


def check_sd_unet(config: dict) -> None:
    for key, expected in UNSUPPORTED_UNET_KEYS.items():
        if key in config and config[key] != expected:
            raise UnsupportedArchitectureError(f"UNet config has {key}={config[key]!r}; only SD 1.x/2.x UNets "
                                               f"({key}={expected!r}) are supported")
    for block in list(config["down_block_types"]) + list(config["up_block_types"]):
        if block not in (CROSS_DOWN, PLAIN_DOWN, CROSS_UP, PLAIN_UP):
            raise UnsupportedArchitectureError(f"UNet block type {block!r} is not part of SD 1.x/2.x")
    if config.get("only_cross_attention") not in (None, False):
        raise UnsupportedArchitectureError("UNet config: only_cross_attention is not part of SD 1.x/2.x")


def unet_names(config: dict) -> Pairs:
    """(diffusers, LDM) names of a UNet2DConditionModel built from `config` (LDM names without prefix)."""
    check_sd_unet(config)
    channels = [int(c) for c in config["block_out_channels"]]
    n, per = len(channels), int(config.get("layers_per_block", 2))
    depth = _per_block(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block")
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    pairs = _wb("conv_in", "input_blocks.0.0") + _wb("time_embedding.linear_1", "time_embed.0")
    pairs += _wb("time_embedding.linear_2", "time_embed.2")
    ldm = 1
    for i, kind in enumerate(down_types):
        for j in range(per):
            in_ch = (channels[i - 1] if i else channels[0]) if j == 0 else channels[i]
            pairs += _unet_resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{ldm}.0", in_ch != channels[i])
            if kind == CROSS_DOWN:
                pairs += _transformer(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{ldm}.1", depth[i])
            ldm += 1
        if i < n - 1:
            pairs += _wb(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{ldm}.0.op")
            ldm += 1
    pairs += _unet_resnet("mid_block.resnets.0", "middle_block.0", False)
    pairs += _transformer("mid_block.attentions.0", "middle_block.1", depth[-1])
    pairs += _unet_resnet("mid_block.resnets.1", "middle_block.2", False)
    reversed_depth = depth[::-1]
    ldm = 0
    for i, kind in enumerate(up_types):
        for j in range(per + 1):
            pairs += _unet_resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{ldm}.0", True)
            if kind == CROSS_UP:
                pairs += _transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{ldm}.1", reversed_depth[i])
            if j == per and i < n - 1:
                pairs += _wb(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{ldm}.{2 if kind == CROSS_UP else 1}.conv")
            ldm += 1
    return pairs + _wb("conv_norm_out", "out.0") + _wb("conv_out", "out.2")


def _vae_resnet(d: str, l: str, shortcut: bool) -> Pairs:
    pairs = _wb(f"{d}.norm1", f"{l}.norm1") + _wb(f"{d}.conv1", f"{l}.conv1")
    pairs += _wb(f"{d}.norm2", f"{l}.norm2") + _wb(f"{d}.conv2", f"{l}.conv2")
    return pairs + (_wb(f"{d}.conv_shortcut", f"{l}.nin_shortcut") if shortcut else [])


VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def _vae_mid(d: str, l: str) -> Pairs:
    pairs = _vae_resnet(f"{d}.mid_block.resnets.0", f"{l}.mid.block_1", False)
    for ours, theirs in VAE_ATTENTION:
        pairs += _wb(f"{d}.mid_block.attentions.0.{ours}", f"{l}.mid.attn_1.{theirs}")
    return pairs + _vae_resnet(f"{d}.mid_block.resnets.1", f"{l}.mid.block_2", False)


def vae_names(config: dict) -> Pairs:
    """(diffusers, LDM) names of an AutoencoderKL built from `config`."""
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if config.get(key, True) is not True:
            raise UnsupportedArchitectureError(f"VAE config has {key}={config[key]!r}; SD 1.x/2.x VAEs have it True")
    channels = [int(c) for c in config["block_out_channels"]]
    n, per = len(channels), int(config.get("layers_per_block", 2))
    pairs = _wb("encoder.conv_in", "encoder.conv_in")
    for i in range(n):
        for j in range(per):
            in_ch = (channels[i - 1] if i else channels[0]) if j == 0 else channels[i]
            pairs += _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}",
                                 in_ch != channels[i])
        if i < n - 1:
            pairs += _wb(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    pairs += _vae_mid("encoder", "encoder") + _wb("encoder.conv_norm_out", "encoder.norm_out")
    pairs += _wb("encoder.conv_out", "encoder.conv_out") + _wb("decoder.conv_in", "decoder.conv_in")
    pairs += _vae_mid("decoder", "decoder")
    reversed_channels = channels[::-1]
    for i in range(n):
        out_ch, prev = reversed_channels[i], reversed_channels[max(i - 1, 0)]
        for j in range(per + 1):
            pairs += _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}",
                                 j == 0 and prev != out_ch)
        if i < n - 1:
            pairs += _wb(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
    pairs += _wb("decoder.conv_norm_out", "decoder.norm_out") + _wb("decoder.conv_out", "decoder.conv_out")
    return pairs + _wb("quant_conv", "quant_conv") + _wb("post_quant_conv", "post_quant_conv")


def is_vae_attention_weight(diffusers_name: str) -> bool:
    """VAE attention projections: Linear in diffusers, 1x1 Conv (4-D weight) in LDM."""
    return ".mid_block.attentions.0.to_" in diffusers_name and diffusers_name.endswith(".weight")


TEXT_LAYER_PARTS = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def text_encoder_names(num_layers: int) -> list[str]:
    """Parameter names of transformers' CLIPTextModel with `num_layers` layers."""
    names = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight"]
    for i in range(num_layers):
        for part in TEXT_LAYER_PARTS:
            names += [f"text_model.encoder.layers.{i}.{part}.weight", f"text_model.encoder.layers.{i}.{part}.bias"]
    return names + ["text_model.final_layer_norm.weight", "text_model.final_layer_norm.bias"]

