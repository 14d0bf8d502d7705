"""transformers' CLIPModel as an image / text embedder for CLIP score: numpy in, unnormalised projections out."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.backends.torch.networks import build_network, resolve_device


def clip_model(config: dict) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    return CLIPModel(CLIPConfig.from_dict(config))


class TorchClipEmbedder:
    def __init__(self, config: dict, state: dict[str, np.ndarray], source: str, device: str = "auto"):
        """Builds transformers' CLIPModel without random init and fills it tensor by tensor from `state` (the
        torch backend's build_network: strict, and `state` is emptied as it is copied)."""
        self.device = resolve_device(device)
        self.model = build_network("CLIPModel", clip_model, config, state, source).eval().to(self.device)

    @torch.no_grad()
    def image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 from CLIPImageProcessor -> (N, projection_dim) image embeddings."""
        x = torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32)).to(self.device)
        return self.model.get_image_features(pixel_values=x).float().cpu().numpy()

    @torch.no_grad()
    def text_embeddings(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """(N, L) token ids and mask -> (N, projection_dim) text embeddings."""
        ids = torch.from_numpy(np.asarray(input_ids, np.int64)).to(self.device)
        mask = torch.from_numpy(np.asarray(attention_mask, np.int64)).to(self.device)
        return self.model.get_text_features(input_ids=ids, attention_mask=mask).float().cpu().numpy()
