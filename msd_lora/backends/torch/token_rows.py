"""Rows appended to a transformers CLIP text encoder's token-embedding table, held apart from the frozen table: the
table itself never receives a gradient or an update, so its rows stay bit-identical whatever trains."""
from __future__ import annotations

import numpy as np
import torch

from msd_lora.embeddings.tokens import ROWS_PARAMETER


class ExtendedEmbedding(torch.nn.Module):
    """token ids -> vectors of `base_layer`'s table followed by the added rows (ids from the table's size on)."""

    def __init__(self, base_layer: torch.nn.Embedding, rows: np.ndarray, trainable: bool):
        super().__init__()
        self.base_layer = base_layer
        tensor = torch.from_numpy(np.ascontiguousarray(rows, np.float32)).to(base_layer.weight.device)
        self.register_parameter(ROWS_PARAMETER, torch.nn.Parameter(tensor, requires_grad=trainable))

    @property
    def rows(self) -> torch.nn.Parameter:
        return getattr(self, ROWS_PARAMETER)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Each id's row from the base table or the added rows: two lookups, no copy of the (SD: 49408-row) table."""
        vocab = self.base_layer.num_embeddings
        base = self.base_layer(input_ids.clamp(max=vocab - 1))
        added = torch.nn.functional.embedding((input_ids - vocab).clamp(min=0), self.rows.to(base.dtype))
        return torch.where((input_ids >= vocab).unsqueeze(-1), added, base)
