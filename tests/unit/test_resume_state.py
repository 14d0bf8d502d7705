"""A resume file's backend state is checked against the model before anything is restored."""
import numpy as np
import pytest

from msd_lora.checkpoint import check_training_state
from msd_lora.errors import ResumeError

SHAPES = {"unet.a.lora_A.weight": (2, 3), "unet.a.lora_B.weight": (3, 2)}


def state_arrays(prefixes=("optimizer.exp_avg", "optimizer.exp_avg_sq", "ema")):
    return {f"{p}.{k}": np.full(s, 0.5, np.float32) for p in prefixes for k, s in SHAPES.items()}


def test_a_complete_state_is_returned_by_kind():
    state = check_training_state(state_arrays(), {"optimizer_step": 3, "loss_scale": 512.0,
                                                  "scaler_growth_tracker": 2}, SHAPES)
    assert state.optimizer_step == 3 and state.loss_scale == 512.0 and state.scaler_growth_tracker == 2
    assert set(state.optimizer["exp_avg"]) == set(state.optimizer["exp_avg_sq"]) == set(state.ema) == set(SHAPES)


def test_absent_kinds_mean_fresh_moments_ema_from_weights_and_the_configured_scale():
    state = check_training_state({}, {"optimizer_step": 0}, SHAPES)
    assert state.optimizer is None and state.ema is None and state.loss_scale is None


@pytest.mark.parametrize("arrays, scalars, message", [
    ({**state_arrays(), "optimizer.exp_avg.unet.a.lora_A.weight": np.zeros((4, 3), np.float32)}, {"optimizer_step": 1},
     r"run.safetensors: optimizer.exp_avg.unet.a.lora_A.weight has shape \(4, 3\), this run's LoRA needs "
     r"\(2, 3\): it was written with another lora_rank"),
    ({**state_arrays(), "ema.unet.b.lora_A.weight": np.zeros((2, 3), np.float32)}, {"optimizer_step": 1},
     r"1 arrays fit no LoRA tensor of this model \(e.g. \['ema.unet.b.lora_A.weight'\]\)"),
    ({k: v for k, v in state_arrays().items() if k != "ema.unet.a.lora_B.weight"}, {"optimizer_step": 1},
     r"ema holds 1 of the 2 LoRA tensors \(missing e.g. \['unet.a.lora_B.weight'\]\): the file is incomplete"),
    (state_arrays(("ema",)), {"optimizer_step": 5}, r"4 of adamw's 4 state arrays are missing .* at optimizer step 5"),
    (state_arrays(), {"optimizer_step": 2, "optimizer": "prodigy"}, r"holds prodigy's state at optimizer step 2; "
                                                                   r"this run uses adamw: set optim: prodigy"),
])
def test_bad_states_are_refused_with_the_reason(arrays, scalars, message):
    with pytest.raises(ResumeError, match=message):
        check_training_state(arrays, scalars, SHAPES, source="run.safetensors")


def test_each_optimizer_checks_its_own_state_shapes():
    shapes = {"unet.a.lora_A.weight": (2, 3, 3, 3), "unet.a.lora_magnitude_vector": (4,)}
    arrays = {"optimizer.exp_avg_sq_row.unet.a.lora_A.weight": np.zeros((2, 3, 3), np.float32),
              "optimizer.exp_avg_sq_col.unet.a.lora_A.weight": np.zeros((2, 3, 3), np.float32),
              "optimizer.exp_avg_sq.unet.a.lora_magnitude_vector": np.zeros(4, np.float32)}
    state = check_training_state(arrays, {"optimizer_step": 1, "optimizer": "adafactor"}, shapes, "adafactor")
    assert set(state.optimizer) == {"exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"}
    with pytest.raises(ResumeError, match="d_numerator"):
        check_training_state({f"optimizer.{n}.{k}": np.zeros(s, np.float32) for k, s in SHAPES.items()
                              for n in ("exp_avg", "exp_avg_sq", "s", "p0")},
                             {"optimizer_step": 1, "optimizer": "prodigy"}, SHAPES, "prodigy")
