"""CPU kernel substitutes: each against its op's maths in torch/numpy (values and gradients), then mindone's SD
networks against diffusers/transformers on one random tiny SD folder, compiled in GRAPH mode."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
pytest.importorskip("mindone")
pytest.importorskip("diffusers")

from mindspore import mint

from msd_lora.backends.mindspore import kernels
from tests.conftest import REPO

ms.set_device("CPU")
SUBSTITUTED = kernels.apply_cpu_kernel_substitutes()  # before any network is built or compiled


@pytest.fixture(autouse=True, scope="module")
def pynative_mode():
    """Op checks run eagerly (their lambdas can't be graph-compiled); network checks compile with ms.jit. Other
    modules may have left GRAPH mode set: take PYNATIVE for this module and hand the previous mode back."""
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=previous)
OP_RTOL = 1e-5  # one op in fp32
NET_RTOL = 1e-4  # a whole network in fp32


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got = got.asnumpy() if isinstance(got, ms.Tensor) else np.asarray(got)
    want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def check_against_torch(ms_fn, torch_fn, *inputs: np.ndarray, cell=None, module=None, rtol: float = OP_RTOL):
    """ms_fn and torch_fn agree in value and in the gradients of sum(out * cotangent) w.r.t. every input and,
    when a Cell and its torch twin are given, every parameter (copied from torch by name first)."""
    if cell is not None:
        torch_state = dict(module.named_parameters())
        for p in cell.trainable_params():
            p.set_data(ms.Tensor(torch_state[p.name].detach().numpy()))
    t_inputs = [torch.tensor(a, requires_grad=True) for a in inputs]
    t_out = torch_fn(*t_inputs)
    cotangent = randn(*t_out.shape, seed=99)
    (t_out * torch.tensor(cotangent)).sum().backward()

    weights = cell.trainable_params() if cell is not None else None
    positions = tuple(range(len(inputs)))
    grad_fn = ms.grad(lambda *xs: (ms_fn(*xs) * ms.Tensor(cotangent)).sum(), positions, weights)
    ms_inputs = [ms.Tensor(a) for a in inputs]
    grads = grad_fn(*ms_inputs)
    input_grads, weight_grads = grads if weights is not None else (grads, ())
    input_grads = input_grads if isinstance(input_grads, tuple) else (input_grads,)

    assert rel_err(ms_fn(*ms_inputs), t_out) < rtol
    for got, t in zip(input_grads, t_inputs):
        assert rel_err(got, t.grad) < rtol
    for got, p in zip(weight_grads, weights or ()):
        assert rel_err(got, torch_state[p.name].grad) < rtol, p.name


# --- the module's contract ------------------------------------------------------------------------------------

def test_applied_once_and_only_on_cpu():
    assert SUBSTITUTED == kernels.apply_cpu_kernel_substitutes()  # idempotent
    assert "mint.nn.Conv2d.construct" in SUBSTITUTED and mint.arange is kernels.arange
    assert kernels.needs_substitutes("CPU") and not kernels.needs_substitutes("Ascend")


def test_other_versions_warn_not_fail(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.warn_on_unverified_versions()  # the verified pair: silent
    monkeypatch.setattr(kernels, "VERIFIED_VERSIONS", {"mindspore": "0.0", "mindone": "0.0"})
    with pytest.warns(UserWarning, match="verified with"):
        kernels.warn_on_unverified_versions()


# --- each substitute against its op's definition ----------------------------------------------------------------

@pytest.mark.parametrize("args", [(7,), (2, 11, 3), (0.5, 3.0, 0.25)])
def test_arange(args):
    assert np.array_equal(mint.arange(*args, dtype=ms.float32).asnumpy(), np.arange(*args, dtype=np.float32))
    assert mint.arange(5).dtype == ms.int64


def test_exp_is_float32_exact():
    x = np.linspace(-20, 10, 20001).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(mint.exp(ms.Tensor(x)).asnumpy() - exact) / exact) < 1.2e-7  # numpy's float32 exp: 1.2e-7
    check_against_torch(mint.exp, torch.exp, randn(3, 7))


@pytest.mark.parametrize("kernel,stride,padding,dilation,groups", [
    (3, 1, 1, 1, 1), (1, 1, 0, 1, 1), (3, 2, 1, 1, 1), (3, 2, 0, 1, 1),  # the convs SD uses
    ((3, 1), 1, (2, 0), 2, 1), (1, 2, 0, 1, 1), (3, 1, 1, 1, 2)])  # beyond SD: dilation, 1x1 stride 2, groups
def test_conv2d(kernel, stride, padding, dilation, groups):
    module = torch.nn.Conv2d(6, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = mint.nn.Conv2d(6, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_against_torch(conv, module, randn(2, 6, 9, 7), cell=conv, module=module)


@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d_with_fewer_pixels_than_channels(stride):
    """The dense-layer form the substitute takes in deep, low-resolution blocks (n * h_out * w_out <= out)."""
    module = torch.nn.Conv2d(6, 40, 3, stride=stride, padding=1)
    conv = mint.nn.Conv2d(6, 40, 3, stride=stride, padding=1)
    check_against_torch(conv, module, randn(2, 6, 4, 3), cell=conv, module=module)


def test_layer_norm():
    module = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(randn(16, seed=1)))
        module.bias.copy_(torch.tensor(randn(16, seed=2)))
    norm = mint.nn.LayerNorm(16, eps=1e-5)
    check_against_torch(norm, module, 3.0 + 2.0 * randn(2, 7, 16), cell=norm, module=module)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    check_against_torch(lambda x: mint.nn.functional.gelu(x, approximate=approximate),
                        lambda x: torch.nn.functional.gelu(x, approximate=approximate), 3.0 * randn(4, 33))
    check_against_torch(mint.nn.GELU(approximate), torch.nn.GELU(approximate), randn(5))


def test_constant_pad():
    x = randn(2, 3, 4, 5)
    got = mint.nn.functional.pad(ms.Tensor(x), (0, 1, 2, 0), mode="constant", value=0.5)
    assert np.array_equal(got.asnumpy(), np.pad(x, ((0, 0), (0, 0), (2, 0), (0, 1)), constant_values=0.5))
    check_against_torch(lambda t: mint.nn.functional.pad(t, (1, 1, 0, 1)),
                        lambda t: torch.nn.functional.pad(t, (1, 1, 0, 1)), x)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    check_against_torch(lambda a, b: mint.nn.functional.mse_loss(a, b, reduction=reduction),
                        lambda a, b: torch.nn.functional.mse_loss(a, b, reduction=reduction),
                        randn(2, 4, 3, 3), randn(2, 4, 3, 3, seed=1))


def test_geglu():
    from diffusers.models.activations import GEGLU as TorchGEGLU
    from mindone.diffusers.models.activations import GEGLU

    module, geglu = TorchGEGLU(8, 12), GEGLU(8, 12)
    check_against_torch(geglu, module, randn(2, 5, 8), cell=geglu, module=module)


REPEATED_GRADIENT_RUNS = """
import numpy as np, mindspore as ms
from mindspore import mint
from msd_lora.backends.mindspore.kernels import apply_cpu_kernel_substitutes
apply_cpu_kernel_substitutes()
conv = mint.nn.Conv2d(4, 4, 3, padding=1)
def loss(x):
    return (conv(mint.nn.functional.pad(x, (0, 1, 0, 1))) ** 2).sum()
step = ms.jit(ms.value_and_grad(loss, 0, conv.trainable_params()))
for _ in range(15):
    step(ms.Tensor(np.ones((1, 4, 6, 6), np.float32)))[0].asnumpy()
"""


def test_compiled_gradients_survive_repeated_runs(tmp_path):
    """A compiled gradient through ConstantPadND/PadV3 hangs after a few runs on CPU; the substitutes avoid it.
    In a subprocess, so that a hang fails the test instead of stopping the run (GRAPH mode needs a source file)."""
    script = tmp_path / "repeated_gradient_runs.py"
    script.write_text(REPEATED_GRADIENT_RUNS)
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                   timeout=120, check=True, capture_output=True)


# --- mindone's networks against diffusers / transformers, GRAPH mode ------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A random tiny SD in diffusers layout (configs/model/tiny.yaml); 1-D parameters (norm affines, biases)
    perturbed off their constant initial values so that every parameter matters."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from msd_lora.models.model_config import load_model_config

    arch = load_model_config(REPO / "configs/model/tiny.yaml").architecture
    folder = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    models = {"unet": UNet2DConditionModel(**arch["unet"]), "vae": AutoencoderKL(**arch["vae"]),
              "text_encoder": CLIPTextModel(CLIPTextConfig(**arch["text_encoder"]))}
    for name, model in models.items():
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(folder / name)
        model.eval()
    return str(folder), models


def mindone_model(folder: str, subfolder: str):
    from mindone.diffusers import AutoencoderKL, UNet2DConditionModel
    from mindone.transformers import CLIPTextModel

    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    return classes[subfolder].from_pretrained(folder, subfolder=subfolder)


def test_unet_matches_diffusers_forward_and_gradients(tiny_sd):
    folder, torch_models = tiny_sd
    reference, unet = torch_models["unet"], mindone_model(folder, "unet")
    sample, context, target = randn(2, 4, 16, 16, seed=1), randn(2, 77, 64, seed=2), randn(2, 4, 16, 16, seed=3)
    timesteps = np.array([10, 700])
    names = ["conv_in.weight", "down_blocks.0.resnets.0.norm1.weight", "down_blocks.1.downsamplers.0.conv.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
             "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
             "mid_block.attentions.0.transformer_blocks.0.norm3.bias", "up_blocks.2.resnets.1.conv2.weight",
             "time_embedding.linear_1.weight"]  # fed by the sinusoidal features: needs the exact `exp`
    params = {p.name: p for p in unet.trainable_params()}
    weights = [params[n] for n in names]

    def loss_and_output(x, t, c, y):
        out = unet(x, t, c)[0]
        return mint.nn.functional.mse_loss(out, y), out

    grad_fn = ms.value_and_grad(loss_and_output, None, weights, has_aux=True)

    @ms.jit
    def train_forward(x, t, c, y):
        return grad_fn(x, t, c, y)

    unet.set_train(True)
    (loss, out), grads = train_forward(ms.Tensor(sample), ms.Tensor(timesteps), ms.Tensor(context), ms.Tensor(target))

    want_out = reference(torch.tensor(sample), torch.tensor(timesteps), torch.tensor(context)).sample
    torch.nn.functional.mse_loss(want_out, torch.tensor(target)).backward()
    want_grads = dict(reference.named_parameters())
    assert rel_err(out, want_out) <= NET_RTOL
    for name, got in zip(names, grads):
        assert rel_err(got, want_grads[name].grad) <= NET_RTOL, name


def test_vae_matches_diffusers(tiny_sd):
    folder, torch_models = tiny_sd
    reference, vae = torch_models["vae"], mindone_model(folder, "vae")
    pixels, latents = np.tanh(randn(2, 3, 32, 32, seed=4)), randn(2, 4, 16, 16, seed=5)

    @ms.jit
    def encode(x):
        return vae.encode(x)[0]  # the posterior's moments: mean and log-variance on the channel axis

    @ms.jit
    def decode(z):
        return vae.decode(z)[0]

    with torch.no_grad():
        want_moments = reference.encode(torch.tensor(pixels)).latent_dist.parameters
        want_pixels = reference.decode(torch.tensor(latents)).sample
    assert rel_err(encode(ms.Tensor(pixels)), want_moments) <= NET_RTOL
    assert rel_err(decode(ms.Tensor(latents)), want_pixels) <= NET_RTOL


def test_text_encoder_matches_transformers(tiny_sd):
    folder, torch_models = tiny_sd
    reference, text_encoder = torch_models["text_encoder"], mindone_model(folder, "text_encoder")
    ids = np.random.default_rng(6).integers(0, 600, (2, 77))
    ids[:, 0], ids[0, 9:], ids[1, 30:] = 600, 601, 601  # bos, prompt, eos then eos-padding

    @ms.jit
    def encode(token_ids):
        return text_encoder(token_ids)[:2]

    hidden, pooled = encode(ms.Tensor(ids))
    with torch.no_grad():
        want = reference(torch.tensor(ids))
    assert rel_err(hidden, want.last_hidden_state) <= NET_RTOL
    assert rel_err(pooled, want.pooler_output) <= NET_RTOL
