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
    def __init__(self, size: int, betas: tuple[float, float], eps: float, weight_decay: float | np.ndarray):
        """`weight_decay`: one rate, or one per element of the flat vector."""
        super().__init__(auto_prefix=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = Tensor(weight_decay) if isinstance(weight_decay, np.ndarray) else float(weight_decay)
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


class FlatProdigy(nn.Cell):
    """Prodigy as prodigyopt 1.1.2 computes it (decoupled weight decay, slice_p 1), on the flat vector. Per step, with
    d the step-size estimate (d0 = 1e-6 at first), beta3 = sqrt(beta2), dlr = d * lr (* Adam's bias correction):
        m <- b1 m + d (1 - b1) g;  v <- b2 v + d^2 (1 - b2) g^2;  s <- b3 s + (d / d0) dlr g   (dlr -> d: safeguard)
        numerator <- b3 numerator + (d / d0) dlr <g, p0 - p>;  d_hat = d_coef numerator / sum|s|
        d <- d_max <- max(d_max, d_hat)   (prodigyopt's rule with its default, infinite growth rate)
        p <- p (1 - wd dlr) - dlr m / (sqrt(v) + d eps)        (dlr of the old d, eps scaled by the new d)
    When sum|s| is 0 the moments and s are kept updated and nothing else changes (prodigyopt returns early). The
    scalars are float32 here (prodigyopt keeps Python floats). `finite` False leaves everything unchanged."""

    def __init__(self, size: int, betas: tuple[float, float], eps: float, weight_decay: float, d0: float,
                 d_coef: float, use_bias_correction: bool, safeguard_warmup: bool, initial: np.ndarray):
        super().__init__(auto_prefix=False)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.beta3 = float(np.sqrt(self.beta2))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.d0, self.d_coef = float(d0), float(d_coef)
        self.use_bias_correction, self.safeguard_warmup = use_bias_correction, safeguard_warmup
        zeros = np.zeros(size, np.float32)
        self.exp_avg = Parameter(Tensor(zeros), name="optimizer.exp_avg", requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(zeros), name="optimizer.exp_avg_sq", requires_grad=False)
        self.s = Parameter(Tensor(zeros), name="optimizer.s", requires_grad=False)
        self.p0 = Parameter(Tensor(np.asarray(initial, np.float32)), name="optimizer.p0", requires_grad=False)
        self.step = Parameter(Tensor(0.0, ms.float32), name="optimizer.step", requires_grad=False)
        self.d = Parameter(Tensor(self.d0, ms.float32), name="optimizer.d", requires_grad=False)
        self.d_max = Parameter(Tensor(self.d0, ms.float32), name="optimizer.d_max", requires_grad=False)
        self.d_numerator = Parameter(Tensor(0.0, ms.float32), name="optimizer.d_numerator", requires_grad=False)

    def construct(self, params: Tensor, grads: Tensor, lr: Tensor, finite: Tensor) -> Tensor:
        d, k = self.d + 0.0, self.step + 0.0
        correction = ops.sqrt(1.0 - ops.pow(self.beta2, k + 1.0)) / (1.0 - ops.pow(self.beta1, k + 1.0)) \
            if self.use_bias_correction else 1.0
        dlr = d * lr * correction
        numerator = self.d_numerator * self.beta3 + (d / self.d0) * dlr * (grads * (self.p0 - params)).sum()
        m = self.beta1 * self.exp_avg + d * (1.0 - self.beta1) * grads
        v = self.beta2 * self.exp_avg_sq + d * d * (1.0 - self.beta2) * grads * grads
        s = self.beta3 * self.s + (d / self.d0) * (d if self.safeguard_warmup else dlr) * grads
        denominator = ops.abs(s).sum()
        ops.assign(self.exp_avg, ops.select(finite, m, self.exp_avg))
        ops.assign(self.exp_avg_sq, ops.select(finite, v, self.exp_avg_sq))
        ops.assign(self.s, ops.select(finite, s, self.s))
        proceed = ops.logical_and(finite, denominator > 0.0)
        d_hat = self.d_coef * numerator / ops.maximum(denominator, 1e-30)
        # prodigyopt: d = max(d, d_hat) on the first step, d_max = max(d_max, d_hat), d = min(d_max, d * growth_rate):
        # with its default infinite growth rate that is d_max, on every step
        new_d = ops.maximum(self.d_max, d_hat)
        d_max = new_d
        ops.assign(self.d_numerator, ops.select(proceed, numerator, self.d_numerator))
        ops.assign(self.d_max, ops.select(proceed, d_max, self.d_max))
        ops.assign(self.d, ops.select(proceed, new_d, self.d))
        ops.assign(self.step, ops.select(proceed, k + 1.0, k))
        stepped = params * (1.0 - self.weight_decay * dlr) - dlr * m / (ops.sqrt(v) + new_d * self.eps)
        return ops.select(proceed, stepped, params)


class FlatAdafactor(nn.Cell):
    """transformers' Adafactor with kohya's LoRA settings (no relative step, no parameter scaling, no first moment) on
    the flat vector. Per tensor of 2+ dimensions, with rows = every index but the last, cols = every index but the
    second-to-last, beta2_t = 1 - t^-0.8 and u = g^2 + 1e-30:
        R <- beta2_t R + (1 - beta2_t) mean_last(u);  C <- beta2_t C + (1 - beta2_t) mean_second_last(u)
        update = g / sqrt(R / mean_over_second_last(R) * C)        (1-D tensors: V <- ..., update = g / sqrt(V))
        update /= max(1, rms(update) / 1.0);  p <- p (1 - wd lr) - lr update        (rms per tensor)
    The per-element row, column and tensor of every flat position are fixed index vectors, so each mean is one
    segment sum. `finite` False leaves everything unchanged."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], weight_decay: float, eps: float, decay_rate: float,
                 clip_threshold: float):
        super().__init__(auto_prefix=False)
        self.weight_decay, self.eps, self.decay_rate = float(weight_decay), float(eps), float(decay_rate)
        self.clip_threshold = float(clip_threshold)
        index = adafactor_index(shapes)
        self.rows, self.cols, self.tensors = (Tensor(index[k]) for k in ("row", "col", "tensor"))
        self.row_groups = Tensor(index["row_group"])  # the group (tensor, leading index) of every row
        self.factored = Tensor(index["factored"])
        self.row_length, self.col_length = Tensor(index["row_length"]), Tensor(index["col_length"])
        self.group_length, self.tensor_size = Tensor(index["group_length"]), Tensor(index["tensor_size"])
        self.n_rows, self.n_cols = int(index["row_length"].size), int(index["col_length"].size)
        self.n_groups, self.n_tensors = int(index["group_length"].size), int(index["tensor_size"].size)
        self.exp_avg_sq_row = Parameter(Tensor(np.zeros(self.n_rows, np.float32)), name="optimizer.exp_avg_sq_row",
                                        requires_grad=False)
        self.exp_avg_sq_col = Parameter(Tensor(np.zeros(self.n_cols, np.float32)), name="optimizer.exp_avg_sq_col",
                                        requires_grad=False)
        self.exp_avg_sq = Parameter(Tensor(np.zeros(index["row"].size, np.float32)), name="optimizer.exp_avg_sq",
                                    requires_grad=False)
        self.step = Parameter(Tensor(0.0, ms.float32), name="optimizer.step", requires_grad=False)

    def _mean(self, values: Tensor, ids: Tensor, count: int, lengths: Tensor) -> Tensor:
        return ops.unsorted_segment_sum(values, ids, count) / lengths

    def construct(self, params: Tensor, grads: Tensor, lr: Tensor, finite: Tensor) -> Tensor:
        step = self.step + 1.0
        beta2t = 1.0 - ops.pow(step, self.decay_rate)
        u = grads * grads + self.eps
        row = beta2t * self.exp_avg_sq_row + (1.0 - beta2t) * self._mean(u, self.rows, self.n_rows, self.row_length)
        col = beta2t * self.exp_avg_sq_col + (1.0 - beta2t) * self._mean(u, self.cols, self.n_cols, self.col_length)
        full = beta2t * self.exp_avg_sq + (1.0 - beta2t) * u
        row_mean = self._mean(row, self.row_groups, self.n_groups, self.group_length)
        r_factor = ops.rsqrt(row / ops.gather(row_mean, self.row_groups, 0))
        factored = ops.gather(r_factor, self.rows, 0) * ops.rsqrt(ops.gather(col, self.cols, 0))
        update = ops.select(self.factored, factored, ops.rsqrt(full)) * grads
        rms = ops.sqrt(self._mean(update * update, self.tensors, self.n_tensors, self.tensor_size))
        update = update / ops.gather(ops.maximum(rms / self.clip_threshold, 1.0), self.tensors, 0)
        stepped = params * (1.0 - self.weight_decay * lr) - lr * update
        ops.assign(self.exp_avg_sq_row, ops.select(finite, row, self.exp_avg_sq_row))
        ops.assign(self.exp_avg_sq_col, ops.select(finite, col, self.exp_avg_sq_col))
        ops.assign(self.exp_avg_sq, ops.select(finite, full, self.exp_avg_sq))
        ops.assign(self.step, ops.select(finite, step, self.step))
        return ops.select(finite, stepped, params)


def adafactor_index(shapes: tuple[tuple[int, ...], ...]) -> dict[str, np.ndarray]:
    """For the flat vector of tensors of `shapes`: each position's row, column and tensor id, each row's group (tensor
    and leading index), whether it is factored, and the segments' lengths. A 1-D tensor's positions get rows and
    columns of their own (unused: they take the unfactored branch)."""
    rows, cols, tensors, factored, row_groups = [], [], [], [], []
    row_length, col_length, group_length, tensor_size = [], [], [], []
    for t, shape in enumerate(shapes):
        size = int(np.prod(shape))
        tensors.append(np.full(size, t, np.int32))
        tensor_size.append(size)
        is_factored = len(shape) >= 2
        factored.append(np.full(size, is_factored))
        if not is_factored:
            rows.append(len(row_length) + np.arange(size, dtype=np.int32))
            cols.append(len(col_length) + np.arange(size, dtype=np.int32))
            row_groups += [len(group_length)] * size
            row_length += [1] * size
            col_length += [1] * size
            group_length.append(size)
            continue
        lead, a, b = int(np.prod(shape[:-2])), shape[-2], shape[-1]
        grid = np.arange(size).reshape(lead, a, b)
        rows.append((len(row_length) + grid // b).reshape(-1).astype(np.int32))  # (lead, a) index
        lead_index, col_index = grid // (a * b), grid % b
        cols.append((len(col_length) + lead_index * b + col_index).reshape(-1).astype(np.int32))
        row_groups += list(len(group_length) + np.repeat(np.arange(lead), a))
        row_length += [b] * (lead * a)
        col_length += [a] * (lead * b)
        group_length += [a] * lead
    return {"row": np.concatenate(rows), "col": np.concatenate(cols), "tensor": np.concatenate(tensors),
            "factored": np.concatenate(factored), "row_group": np.asarray(row_groups, np.int32),
            "row_length": np.asarray(row_length, np.float32), "col_length": np.asarray(col_length, np.float32),
            "group_length": np.asarray(group_length, np.float32), "tensor_size": np.asarray(tensor_size, np.float32)}


def export_state(optimizer: nn.Cell, name: str, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                 split) -> tuple[dict[str, np.ndarray], dict]:
    """A flat optimizer's state as resume arrays `optimizer.<state>.<key>` (`optimizers.state_shapes`) and scalars;
    `split(flat)` cuts a full-length flat vector into the LoRA tensors by key."""
    arrays: dict[str, np.ndarray] = {}
    scalars: dict = {"optimizer": name, "optimizer_step": int(optimizer.step.asnumpy())}
    if name in ("adamw", "prodigy"):
        kinds = ("exp_avg", "exp_avg_sq", "s", "p0") if name == "prodigy" else ("exp_avg", "exp_avg_sq")
        for kind in kinds:
            arrays.update({f"optimizer.{kind}.{k}": v for k, v in split(getattr(optimizer, kind).asnumpy()).items()})
        if name == "prodigy":
            scalars.update({k: float(getattr(optimizer, k).asnumpy()) for k in ("d", "d_max", "d_numerator")})
        return arrays, scalars
    row, col, full = (getattr(optimizer, k).asnumpy() for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"))
    full_parts = split(full)
    r = c = 0
    for key, shape in zip(names, shapes):
        if len(shape) < 2:
            arrays[f"optimizer.exp_avg_sq.{key}"] = full_parts[key]
            r, c = r + int(np.prod(shape)), c + int(np.prod(shape))  # the unused rows / cols of a 1-D tensor
            continue
        n_row, n_col = int(np.prod(shape[:-1])), int(np.prod(shape[:-2])) * shape[-1]
        arrays[f"optimizer.exp_avg_sq_row.{key}"] = row[r:r + n_row].reshape(shape[:-1]).copy()
        arrays[f"optimizer.exp_avg_sq_col.{key}"] = col[c:c + n_col].reshape(shape[:-2] + shape[-1:]).copy()
        r, c = r + n_row, c + n_col
    return arrays, scalars


def import_state(optimizer: nn.Cell, name: str, names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...],
                 join, state, initial: np.ndarray) -> None:
    """Put checked resume state (`checkpoint.check_training_state`) into a flat optimizer; fresh state where the file
    has none (prodigy's p0: the weights it starts from, `initial`). `join(arrays_by_key)` is the inverse of split."""
    def put(param: Parameter, values: np.ndarray) -> None:
        param.set_data(Tensor(np.ascontiguousarray(values, np.float32)))

    fresh = state.optimizer is None
    optimizer.step.set_data(Tensor(float(state.optimizer_step), ms.float32))
    if name in ("adamw", "prodigy"):
        for kind in ("exp_avg", "exp_avg_sq", "s") if name == "prodigy" else ("exp_avg", "exp_avg_sq"):
            put(getattr(optimizer, kind), np.zeros(optimizer.exp_avg.shape, np.float32) if fresh
                else join(state.optimizer[kind]))
        if name == "prodigy":
            put(optimizer.p0, initial if fresh else join(state.optimizer["p0"]))
            scalars = {"d": optimizer.d0, "d_max": optimizer.d0, "d_numerator": 0.0} if fresh \
                else state.optimizer_scalars
            for key, value in scalars.items():
                getattr(optimizer, key).set_data(Tensor(float(value), ms.float32))
        return
    rows, cols, full = [], [], []
    for key, shape in zip(names, shapes):
        size = int(np.prod(shape))
        if len(shape) < 2:
            full.append(np.zeros(size) if fresh else state.optimizer["exp_avg_sq"][key].reshape(-1))
            rows.append(np.zeros(size))
            cols.append(np.zeros(size))
            continue
        full.append(np.zeros(size))
        rows.append(np.zeros(int(np.prod(shape[:-1]))) if fresh else state.optimizer["exp_avg_sq_row"][key].reshape(-1))
        cols.append(np.zeros(int(np.prod(shape[:-2])) * shape[-1]) if fresh
                    else state.optimizer["exp_avg_sq_col"][key].reshape(-1))
    put(optimizer.exp_avg_sq_row, np.concatenate(rows))
    put(optimizer.exp_avg_sq_col, np.concatenate(cols))
    put(optimizer.exp_avg_sq, np.concatenate(full))
