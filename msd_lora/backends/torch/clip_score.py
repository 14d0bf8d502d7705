"""transformers' CLIPModel as an image / text embedder for CLIP score: numpy in, unnormalised projections out."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.models.state_check import check_state_fits


class TorchClipEmbedder:
    def __init__(self, config: dict, state: dict[str, np.ndarray], source: str, device: str = "auto"):
        from transformers import CLIPConfig, CLIPModel

        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        self.model = CLIPModel(CLIPConfig.from_dict(config)).eval()
        expected = {n: tuple(t.shape) for n, t in self.model.state_dict().items()}
        check_state_fits(state, expected, source, "transformers' CLIPModel")
        self.model.load_state_dict({n: torch.from_numpy(np.asarray(v, np.float32)) for n, v in state.items()},
                                   strict=True)
        self.model.to(self.device)

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
