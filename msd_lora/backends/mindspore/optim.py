"""AdamW with torch.optim.AdamW's exact maths, as graph-mode MindSpore ops on one flat vector of LoRA weights.

Neither MindSpore optimizer that runs on CPU matches torch: `nn.AdamWeightDecay` has no bias correction,
and `mint.optim.AdamW` has no CPU kernel. Per step t (torch's single-tensor CPU path), elementwise:
    p <- p * (1 - lr * wd)
    m <- m + (1 - b1) * (g - m);  v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
All LoRA weights live in one flat vector here (see `step.FlatLayout`): the update compiles to a dozen ops
instead of a dozen per tensor, which cut the train step's graph compile time several-fold.
The cell takes a boolean `finite` (the train step passes `update and all gradients finite`): when False nothing
changes (moments, step count and weights all kept).
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops


class FlatAdamW(nn.Cell):
    def __init__(self, size: int, betas: tuple[float, float], eps: float, weight_decay: float):
        super().__init__(auto_prefix=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.exp_avg = Parameter(Tensor(np.zeros(size, np.float32)), name="optimizer.exp_avg", requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(np.zeros(size, np.float32)), name="optimizer.exp_avg_sq",
                                    requires_grad=False)
        self.step = Parameter(Tensor(0.0, ms.float32), name="optimizer.step", requires_grad=False)

    def construct(self, params: Tensor, grads: Tensor, lr: Tensor, finite: Tensor) -> Tensor:
        """The updated flat weights where `finite`, else `params` unchanged; moments and step follow suit."""
        step = ops.select(finite, self.step + 1.0, self.step)
        ops.assign(self.step, step)
        safe_step = ops.maximum(step, 1.0)
        bias1 = 1.0 - ops.pow(self.beta1, safe_step)
        bias2_sqrt = ops.sqrt(1.0 - ops.pow(self.beta2, safe_step))
        m_new = self.exp_avg + (1.0 - self.beta1) * (grads - self.exp_avg)
        v_new = self.beta2 * self.exp_avg_sq + (1.0 - self.beta2) * grads * grads
        decayed = params * (1.0 - lr * self.weight_decay)
        p_new = decayed - (lr / bias1) * m_new / (ops.sqrt(v_new) / bias2_sqrt + self.eps)
        ops.assign(self.exp_avg, ops.select(finite, m_new, self.exp_avg))
        ops.assign(self.exp_avg_sq, ops.select(finite, v_new, self.exp_avg_sq))
        return ops.select(finite, p_new, params)
