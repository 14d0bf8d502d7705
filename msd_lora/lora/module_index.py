"""The module names a LoRA file's keys are resolved against, in every naming the formats use.

kohya/A1111 flatten module paths with underscores (`lora_unet_down_blocks_0_attentions_0_..._to_q`), which
cannot be split back without knowing the modules; mindone names UNet modules by their LDM cell paths. An
index built from the model's configs (or, without a model, the SD 1.x/2.x layout) answers both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from msd_lora.errors import UnsupportedArchitectureError
from msd_lora.models import mindone
from msd_lora.models.layout import text_encoder_names, unet_names

SD_TEXT_LAYERS = 23  # covers SD1's 12 and SD2's 23 layers


def flat(module: str) -> str:
    return module.replace(".", "_")


@dataclass
class ModuleIndex:
    """diffusers module paths of the UNet and text encoder, with their LDM and mindone names."""

    unet: list[str]
    text_encoder: list[str]
    unet_ldm: dict[str, str]  # diffusers module -> LDM module (no `model.diffusion_model.` prefix)
    _flat: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_configs(cls, configs: dict[str, dict]) -> ModuleIndex:
        pairs = [(d[: -len(".weight")], l[: -len(".weight")]) for d, l in unet_names(configs["unet"])
                 if d.endswith(".weight")]
        text = [n[: -len(".weight")] for n in text_encoder_names(int(configs["text_encoder"]["num_hidden_layers"]))
                if n.endswith(".weight")]
        return cls(unet=[d for d, _ in pairs], text_encoder=text, unet_ldm=dict(pairs))

    @classmethod
    def for_model(cls, configs: dict[str, dict]) -> ModuleIndex:
        """The model's own index; the SD 1.x/2.x one when its UNet is not an SD layout the index can describe."""
        try:
            return cls.from_configs(configs)
        except UnsupportedArchitectureError:
            return cls.stable_diffusion()

    @classmethod
    def stable_diffusion(cls) -> ModuleIndex:
        """SD 1.x and 2.x at once: their UNets share every module name; the text index has 23 layers."""
        return _sd_index()

    def resolve_flat(self, component: str, name: str) -> str | None:
        """diffusers module for a kohya flattened name (diffusers- or LDM-style for the UNet), or None."""
        if not self._flat:
            for module in self.unet:
                self._flat[("unet", flat(module))] = module
            for module, ldm in self.unet_ldm.items():
                self._flat.setdefault(("unet", flat(ldm)), module)
            for module in self.text_encoder:
                self._flat[("text_encoder", flat(module))] = module
        return self._flat.get((component, name))

    def mindone_unet(self) -> dict[str, str]:
        """diffusers module -> mindone module (the LDM cell path with mindone's conv wrapping)."""
        return {module: mindone.unet_name(ldm + ".weight").removesuffix(".weight")
                for module, ldm in self.unet_ldm.items()}


@lru_cache(maxsize=1)
def _sd_index() -> ModuleIndex:
    from msd_lora.models.versions import shipped_config

    configs = dict(shipped_config("v1").architecture)
    configs["text_encoder"] = dict(configs["text_encoder"], num_hidden_layers=SD_TEXT_LAYERS)
    return ModuleIndex.from_configs(configs)
