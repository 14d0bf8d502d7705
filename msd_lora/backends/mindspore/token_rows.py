"""Rows appended to mindone's CLIP text encoder's token-embedding table, a parameter of the graph beside the frozen
table (which never receives a gradient or an update, so its rows stay bit-identical whatever trains)."""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from msd_lora.embeddings.tokens import ROWS_PARAMETER


class ExtendedEmbedding(nn.Cell):
    """token ids -> vectors of `base`'s table followed by the added rows (ids from the table's size on)."""

    def __init__(self, base: nn.Embedding, rows: np.ndarray, trainable: bool):
        super().__init__(auto_prefix=False)
        self.base = base
        self.rows = Parameter(Tensor(np.ascontiguousarray(rows, np.float32)), name=ROWS_PARAMETER,
                              requires_grad=trainable)

    def construct(self, input_ids):
        """Each id's row from the base table or the added rows: two gathers, no copy of the (SD: 49408-row) table."""
        table = self.base.embedding_table
        vocab = table.shape[0]
        base = ops.gather(table, ops.clamp(input_ids, max=vocab - 1), 0)
        added = ops.gather(self.rows.astype(table.dtype), ops.clamp(input_ids - vocab, min=0), 0)
        return ops.where(ops.expand_dims(input_ids >= vocab, -1), added, base)


def read_rows(cell: ExtendedEmbedding) -> np.ndarray:
    return cell.rows.asnumpy().astype(np.float32)


def write_rows(cell: ExtendedEmbedding, rows: np.ndarray) -> None:
    cell.rows.set_data(Tensor(np.ascontiguousarray(rows, np.float32), ms.float32))
