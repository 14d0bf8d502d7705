"""mindone.transformers' CLIPModel as an image / text embedder for CLIP score: numpy in, unnormalised projections
out. Weights arrive with transformers' names; mindone names LayerNorm weights gamma/beta and embeddings
embedding_table, mapped here. On CPU the backend's kernel substitutes are applied first (configure_context)."""
from __future__ import annotations

import numpy as np
from mindspore import Tensor, nn

from msd_lora.backends.mindspore.context import configure_context
from msd_lora.models.state_check import check_state_fits

MINDONE_LEAVES = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}


def transformers_name(ms_name: str) -> str:
    stem, _, leaf = ms_name.rpartition(".")
    return f"{stem}.{MINDONE_LEAVES[leaf]}" if leaf in MINDONE_LEAVES else ms_name


class _ImageFeatures(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values)


class _TextFeatures(nn.Cell):
    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)


class MindSporeClipEmbedder:
    def __init__(self, config: dict, state: dict[str, np.ndarray], source: str, device: str = "auto", mode: int = 1):
        configure_context(mode, device)
        from mindone.transformers import CLIPModel
        from transformers import CLIPConfig

        self.model = CLIPModel(CLIPConfig.from_dict(config))
        self.model.set_train(False)
        params = {transformers_name(n): p for n, p in self.model.parameters_and_names()}
        check_state_fits(state, {n: tuple(p.shape) for n, p in params.items()}, source,
                         "mindone.transformers' CLIPModel")
        for name, param in params.items():
            param.set_data(Tensor(np.asarray(state[name], np.float32)))
        self._image, self._text = _ImageFeatures(self.model), _TextFeatures(self.model)

    def image_embeddings(self, pixel_values: np.ndarray) -> np.ndarray:
        return self._image(Tensor(np.ascontiguousarray(pixel_values, np.float32))).asnumpy()

    def text_embeddings(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._text(Tensor(np.asarray(input_ids, np.int64)), Tensor(np.asarray(attention_mask, np.int64))
                          ).asnumpy()
