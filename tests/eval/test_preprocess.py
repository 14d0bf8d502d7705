"""Preprocessing protocols: numpy bilinear against torch's interpolate, identities, scaling, names."""
from __future__ import annotations

import numpy as np
import pytest

from msd_lora.eval.preprocess import PROTOCOLS, get_protocol, inception_input, resize_bilinear_torch, resize_pil_float


def image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("shape", [(40, 40), (17, 23), (512, 512), (300, 299)], ids=str)
def test_bilinear_is_torch_interpolate(shape):
    torch = pytest.importorskip("torch")
    x = image(*shape).astype(np.float32) / 255
    want = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], size=(299, 299),
                                           mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
    # float32 like torch, but torch's vectorised kernel orders some operations differently: 1e-5 of [0, 1]
    np.testing.assert_allclose(resize_bilinear_torch(x), want, atol=1e-5)


def test_pytorch_fid_protocol_scaling():
    x = image(40, 40)
    got = get_protocol("bilinear").prepare(x)
    want = 2 * resize_bilinear_torch(x.astype(np.float32) / 255) - 1
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert got.dtype == np.float32 and got.min() >= -1 and got.max() <= 1


@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_images_already_299_are_not_resampled(name):
    x = image(299, 299, seed=3)
    scaled = 2 * (x / 255.0) - 1 if name == "bilinear" else (x - 128.0) / 128.0
    np.testing.assert_allclose(get_protocol(name).prepare(x), scaled, atol=1e-6)


def test_pil_resize_is_per_channel_float_and_clipped():
    x = image(64, 48, seed=4)
    bicubic = resize_pil_float(x, 299, "bicubic")
    assert bicubic.shape == (299, 299, 3) and bicubic.dtype == np.float32
    assert bicubic.min() >= 0 and bicubic.max() <= 255
    assert not np.allclose(bicubic, np.round(bicubic))  # no re-quantisation to uint8
    one_channel = resize_pil_float(np.repeat(x[:, :, :1], 3, axis=2), 299, "bicubic")
    np.testing.assert_array_equal(one_channel[:, :, 0], one_channel[:, :, 2])
    np.testing.assert_array_equal(one_channel[:, :, 0], bicubic[:, :, 0])


def test_batch_layout_and_mixed_sizes():
    batch = inception_input([image(40, 40), image(64, 32, seed=1)], "pil_bicubic")
    assert batch.shape == (2, 3, 299, 299) and batch.dtype == np.float32


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown resize 'bicubic'; choose one of bilinear, pil_bicubic"):
        get_protocol("bicubic")
