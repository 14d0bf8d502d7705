"""Write the golden pool3 features that tests/eval/test_golden_pool3.py checks our InceptionV3 against, computed by
pytorch-fid itself. Run only by the cross-check interpreter (pytorch-fid + torchvision), never by the test suite:

    PYTHONPATH=/work/main .venv-xcheck/bin/python tests/eval/make_golden_pool3.py tests/eval/golden/pool3_pytorch_fid.npz

The weights are `msd_lora.eval.inception_arch.random_state(0)`, handed to pytorch-fid in place of its download; the
images are small deterministic uint8 pictures (one non-square), stored in the .npz next to the features.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from msd_lora.eval.inception_arch import random_state

SEED = 20250611
WEIGHTS_SEED = 0
SIZES = [(40, 40)] * 5 + [(32, 48)]  # (height, width); the last one is non-square


def golden_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Coarse 6x6 colour noise, bilinearly upsampled, in a random colour cast, plus a little pixel noise."""
    coarse = (rng.uniform(0, 1, (6, 6, 3)) * 255).astype(np.uint8)
    picture = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float64)
    cast = rng.uniform(0.5, 1.0, 3)
    return np.clip(picture * cast + rng.normal(0, 5, picture.shape), 0, 255).astype(np.uint8)


def pytorch_fid_features(images: list[np.ndarray], folder: Path) -> np.ndarray:
    """pool3 features of `images` by pytorch-fid's own pipeline (PNG files -> get_activations), with random weights."""
    import pytorch_fid.inception as pf_inception
    from pytorch_fid.fid_score import get_activations

    weights = folder / "pt_inception-random-seed0.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_state(WEIGHTS_SEED).items()}, weights)
    pf_inception.load_state_dict_from_url = lambda *a, **k: torch.load(weights, weights_only=True)
    model = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    files = []
    for i, image in enumerate(images):
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(image).save(files[-1])
    features = np.zeros((len(images), 2048), np.float32)
    for shape in dict.fromkeys(image.shape for image in images):  # pytorch-fid batches only equal shapes
        rows = [i for i, image in enumerate(images) if image.shape == shape]
        features[rows] = get_activations([str(files[i]) for i in rows], model, batch_size=len(rows), dims=2048,
                                         device="cpu", num_workers=0)
    return features


def main(out_path: str) -> None:
    import pytorch_fid
    import torchvision

    torch.set_grad_enabled(False)
    rng = np.random.default_rng(SEED)
    images = [golden_image(rng, h, w) for h, w in SIZES]
    with tempfile.TemporaryDirectory() as tmp:
        features = pytorch_fid_features(images, Path(tmp))
    about = (f"pytorch-fid {pytorch_fid.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}; "
             f"image seed {SEED}, weights inception_arch.random_state({WEIGHTS_SEED}); get_activations dims=2048 cpu")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, features=features, about=np.asarray(about),
                        **{f"image_{i}": image for i, image in enumerate(images)})
    print(f"{out_path}: {len(images)} images, features {features.shape}; {about}")


if __name__ == "__main__":
    main(*sys.argv[1:])
