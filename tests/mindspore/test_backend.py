"""The MindSpore backend's own pieces: LoRA cells, strict weight loading, the optimizer's maths, bad input.

Cheap checks (PYNATIVE-sized or uncompiled); the compiled train step is exercised in tests/parity.
"""
from __future__ import annotations

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
pytest.importorskip("mindone")

from mindspore import Tensor, mint

from msd_lora.backends.base import BackendOptions
from msd_lora.backends.mindspore.backend import MindSporeBackend
from msd_lora.backends.mindspore.lora import LoraCell
from msd_lora.backends.mindspore.optim import FlatAdamW
from msd_lora.backends.mindspore.step import FlatLayout
from msd_lora.errors import (
    LoraSpecError,
    StateDictError,
)
from msd_lora.lora.core import LoraLayer
from msd_lora.lora.spec import LoraSpec, init_lora_weights, select_targets
from msd_lora.models.pretrained import load_pretrained


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def backend(tiny_model):
    b = MindSporeBackend(BackendOptions(device="cpu"))
    b.load_model(load_pretrained(tiny_model), "epsilon")
    return b


def lora_layer(shape: tuple[int, ...], rank: int, alpha: float) -> LoraLayer:
    return LoraLayer(down=np.zeros((rank, *shape[1:]), np.float32),
                     up=np.zeros((shape[0], rank, *[1] * (len(shape) - 2)), np.float32), alpha=alpha)


@pytest.mark.parametrize("fp16", [False, True])
def test_lora_linear_is_base_plus_scaled_update(fp16):
    base = mint.nn.Linear(12, 10, bias=True)
    cell = LoraCell(base, lora_layer((10, 12), 3, 6.0), fp16=fp16, dora=False, key="unet.x")
    down, up, x = randn(3, 12, seed=1), randn(10, 3, seed=2), randn(5, 12, seed=3)
    cell.down.set_data(Tensor(down))
    cell.up.set_data(Tensor(up))
    want = x @ base.weight.asnumpy().T + base.bias.asnumpy() + 2.0 * (x @ down.T) @ up.T
    got = cell(Tensor(x)).asnumpy()
    assert got.dtype == np.float32 and cell.down.dtype == ms.float32  # fp32 master weights either way
    assert np.abs(got - want).max() / np.abs(want).max() < (2e-3 if fp16 else 1e-6)
    assert cell.base is base  # held, not copied


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_and_conv_cells_compute_the_merged_layer(backend, kind):
    """A LoRA cell's output equals the base layer with the numpy-merged weight (`lora.merge`), DoRA included."""
    from msd_lora.lora.merge import merged_weights

    if kind == "linear":
        base, shape, x = mint.nn.Linear(12, 10, bias=True), (10, 12), randn(5, 12, seed=3)
    else:
        base, shape, x = mint.nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True), (10, 6, 3, 3), randn(2, 6, 9, 9, seed=3)
    layer = lora_layer(shape, 3, 6.0)
    layer.down, layer.up = randn(*layer.down.shape, seed=1) * 0.3, randn(*layer.up.shape, seed=2) * 0.3
    weight = base.weight.asnumpy()
    layer.magnitude = (np.sqrt((weight.reshape(10, -1) ** 2).sum(1)) * np.linspace(0.8, 1.2, 10)).astype(
        np.float32).reshape(10, *[1] * (len(shape) - 1))
    cell = LoraCell(base, layer, fp16=False, dora=True, key="unet.x")
    from msd_lora.backends.mindspore.lora import write_weights

    write_weights({"unet.x": cell}, {"unet.x": layer})
    merged = merged_weights({"unet.x.weight": weight}, [({"unet.x": layer}, 1.0)])["unet.x.weight"]
    plain = type(base)(12, 10, bias=True) if kind == "linear" else mint.nn.Conv2d(6, 10, 3, stride=2, padding=1)
    plain.weight.set_data(Tensor(merged))
    plain.bias.set_data(base.bias.data)
    got, want = cell(Tensor(x)).asnumpy(), plain(Tensor(x)).asnumpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_injection_keeps_names_unique_and_only_lora_trainable(tiny_model):
    b = MindSporeBackend(BackendOptions(device="cpu"))
    b.load_model(load_pretrained(tiny_model), "epsilon")
    spec = LoraSpec(rank=4, alpha=4.0, targets={"unet": ("to_q", "to_v"), "text_encoder": ("q_proj",)})
    shapes = b.layer_shapes()
    targets = select_targets(spec, shapes)
    b.add_lora(spec, targets, init_lora_weights(spec, targets, shapes, seed=0))
    names = [p.name for p in b.unet.get_parameters()] + [p.name for p in b.text_encoder.get_parameters()]
    assert len(names) == len(set(names))  # re-parented base weights keep their own names (GRAPH mode needs it)
    trainable = [p.name for m in (b.unet, b.text_encoder, b.vae) for p in m.trainable_params()]
    assert sorted(trainable) == sorted(f"{k}.lora_{p}.weight" for k in b.lora_cells for p in "AB")
    assert any(k.startswith("text_encoder.") for k in b.lora_cells)


def test_strict_loading_names_missing_unexpected_and_misshaped(tiny_model):
    model = load_pretrained(tiny_model)
    state = model.state["unet"]
    state.pop("conv_in.bias")
    state["conv_in.extra"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(StateDictError) as err:
        MindSporeBackend(BackendOptions(device="cpu")).load_model(model, "epsilon")
    message = str(err.value)
    assert "conv_in.bias" in message and "conv_in.extra" in message and "conv_out.weight" in message
    assert "(4, 4, 3, 3)" in message


def test_base_weights_refuse_a_wrong_shape(backend):
    name = next(iter(backend.base_shapes()))
    with pytest.raises(ValueError, match="does not fit"):
        backend.set_base_weights({name: np.zeros((1, 2, 3), np.float32)})


def test_lora_weights_refuse_other_layers_and_shapes(backend, tiny_model):
    spec = LoraSpec(rank=2, alpha=2.0, targets={"unet": ("to_k",)})
    shapes = backend.layer_shapes()
    targets = select_targets(spec, shapes)
    weights = init_lora_weights(spec, targets, shapes, seed=0)
    key = next(iter(weights))
    fresh = MindSporeBackend(BackendOptions(device="cpu"))
    fresh.load_model(load_pretrained(tiny_model), "epsilon")
    fresh.add_lora(spec, targets, weights)
    wrong = {**weights, key: LoraLayer(down=np.zeros((2, 5), np.float32), up=weights[key].up, alpha=2.0)}
    with pytest.raises(ValueError, match="does not fit"):
        fresh.set_lora_weights(wrong)
    with pytest.raises(ValueError, match="missing"):
        fresh.set_lora_weights({key: weights[key]})


def test_rank_larger_than_a_layer_is_an_error(backend):
    spec = LoraSpec(rank=1000, alpha=1.0, targets={"unet": ("to_q",)})
    with pytest.raises(LoraSpecError, match="lora_rank 1000 is larger than"):
        select_targets(spec, backend.layer_shapes())


def test_flash_attention_on_cpu_falls_back_with_a_warning():  # mindone's v2 yamls set it
    with pytest.warns(UserWarning, match="enable_flash_attention needs Ascend.*standard attention"):
        backend = MindSporeBackend(BackendOptions(device="cpu", enable_flash_attention=True))
    assert not backend.flash_attention


def test_gradient_checkpointing_on_cpu_warns_that_it_saves_no_memory(tiny_model):
    backend = MindSporeBackend(BackendOptions(device="cpu"))
    backend.load_model(load_pretrained(tiny_model), "epsilon")
    with pytest.warns(UserWarning, match="CPU runtime recomputes the blocks but saves no memory"):
        backend.enable_gradient_checkpointing()


def test_unknown_device_is_a_clear_error():
    with pytest.raises(ValueError, match="not a MindSpore target"):
        MindSporeBackend(BackendOptions(device="tpu"))


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_flat_adamw_matches_torch_adamw(weight_decay):
    """Several steps with changing gradients and lr, including a skipped (non-finite) step: torch's AdamW maths."""
    shapes = ((3, 4), (5,))
    layout = FlatLayout(names=("a", "b"), shapes=shapes)
    params = [torch.nn.Parameter(torch.tensor(randn(*s, seed=i))) for i, s in enumerate(shapes)]
    reference = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay)
    ours = FlatAdamW(layout.total, (0.9, 0.98), 1e-6, weight_decay)
    flat = Tensor(layout.join({n: p.detach().numpy() for n, p in zip(layout.names, params)}))
    for step in range(6):
        grads = [randn(*s, seed=10 * step + i) * (10.0 ** (i - step)) for i, s in enumerate(shapes)]
        lr = 1e-3 * (step + 1)
        finite = step != 3
        if finite:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g)
            for group in reference.param_groups:
                group["lr"] = lr
            reference.step()
        flat = ours(flat, Tensor(layout.join(dict(zip(layout.names, grads)))), Tensor(lr, ms.float32),
                    Tensor(finite))
        want = layout.join({n: p.detach().numpy() for n, p in zip(layout.names, params)})
        assert np.abs(flat.asnumpy() - want).max() <= 1e-6 * np.abs(want).max(), step
    assert float(ours.step.asnumpy()) == 5.0  # the skipped step did not count


def test_native_lora_checkpoint_round_trips(backend, tmp_path, tiny_model):
    from msd_lora.lora.formats import read_lora
    from msd_lora.lora.module_index import ModuleIndex

    spec = LoraSpec(rank=4, alpha=8.0, targets={"unet": ("to_q", "to_out.0")})
    shapes = backend.layer_shapes()
    targets = select_targets(spec, shapes)
    weights = init_lora_weights(spec, targets, shapes, seed=1)
    for layer in weights.values():
        layer.up = randn(*layer.up.shape, seed=layer.up.shape[0])
    index = ModuleIndex.for_model(load_pretrained(tiny_model).configs)
    path = backend.save_native_lora(str(tmp_path / "lora.ckpt"), weights, index)
    raw = ms.load_checkpoint(path)
    assert int(raw["lora_rank"].asnumpy()) == 4
    back = read_lora(path, index).weights
    for key, layer in weights.items():
        want = 2.0 * layer.up @ layer.down  # alpha / rank = 2 folded into B by mindone's format
        got = back[key].scale * back[key].up @ back[key].down
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), key
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
