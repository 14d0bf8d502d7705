"""AdamW with torch.optim.AdamW's exact maths, as graph-mode MindSpore ops.

Neither MindSpore optimizer that runs on CPU matches torch: `nn.AdamWeightDecay` has no bias correction,
and `mint.optim.AdamW` has no CPU kernel. Per step t (torch's single-tensor CPU path):
    p <- p * (1 - lr * wd)
    m <- m + (1 - b1) * (g - m);  v <- b2 * v + (1 - b2) * g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
The cell takes a boolean `finite`: when False nothing changes (moments, step count and weights all kept).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


def _zeros(param: Parameter, name: str) -> Parameter:
    return Parameter(Tensor(np.zeros(param.shape, np.float32)), name=name, requires_grad=False)


class AdamW(nn.Cell):
    def __init__(self, params: list[Parameter], names: list[str], betas: tuple[float, float], eps: float,
                 weight_decay: float):
        """`names`: the canonical key of each parameter; the moments are named after them."""
        super().__init__(auto_prefix=False)
        self.params = ParameterTuple(params)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.exp_avg = ParameterTuple([_zeros(p, f"optimizer.exp_avg.{n}") for p, n in zip(params, names)])
        self.exp_avg_sq = ParameterTuple([_zeros(p, f"optimizer.exp_avg_sq.{n}") for p, n in zip(params, names)])
        self.step = Parameter(Tensor(0.0, ms.float32), name="optimizer.step", requires_grad=False)

    def construct(self, grads: tuple[Tensor, ...], lr: Tensor, finite: Tensor) -> Tensor:
        """One update where `finite`; returns the new step count (a dependency handle for graph mode)."""
        step = ops.select(finite, self.step + 1.0, self.step)
        ops.assign(self.step, step)
        safe_step = ops.maximum(step, 1.0)
        bias1 = 1.0 - ops.pow(self.beta1, safe_step)
        bias2_sqrt = ops.sqrt(1.0 - ops.pow(self.beta2, safe_step))
        for param, grad, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            grad = grad.astype(ms.float32)
            m_new = m + (1.0 - self.beta1) * (grad - m)
            v_new = self.beta2 * v + (1.0 - self.beta2) * grad * grad
            decayed = param * (1.0 - lr * self.weight_decay)
            p_new = decayed - (lr / bias1) * m_new / (ops.sqrt(v_new) / bias2_sqrt + self.eps)
            ops.assign(m, ops.select(finite, m_new, m))
            ops.assign(v, ops.select(finite, v_new, v))
            ops.assign(param, ops.select(finite, p_new, param))
        return step
