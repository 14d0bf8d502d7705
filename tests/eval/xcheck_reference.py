"""Reference numbers from the reference tools, run by the cross-check interpreter (.venv-xcheck: pytorch-fid,
clean-fid, torchmetrics + torch-fidelity, torchvision), never imported by the test process.

    .venv-xcheck/bin/python tests/eval/xcheck_reference.py JOB.json OUT.npz

JOB.json: {"weights_pth", "real_dir", "gen_dir", "stats_npz"}; the .pth is a randomly initialised weight file in
pytorch-fid's layout, handed to pytorch-fid in place of its download and to torchmetrics as its weights path.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pytorch_fid_reference(job: dict) -> dict:
    import pytorch_fid.inception as pf_inception
    from pytorch_fid.fid_score import calculate_frechet_distance, get_activations

    pf_inception.load_state_dict_from_url = lambda *a, **k: torch.load(job["weights_pth"], weights_only=True)
    model = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    out = {}
    for key in ("real", "gen"):
        files = sorted(str(p) for p in Path(job[f"{key}_dir"]).glob("*.png"))
        out[f"pytorch_fid_{key}"] = get_activations(files, model, batch_size=len(files), dims=2048, device="cpu",
                                                    num_workers=0)
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in (out["pytorch_fid_real"], out["pytorch_fid_gen"])]
    out["pytorch_fid_fid"] = np.asarray(calculate_frechet_distance(*stats[0], *stats[1]))
    return out


def uint8_batch(folder: str) -> torch.Tensor:
    files = sorted(Path(folder).glob("*.png"))
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


def torchmetrics_reference(job: dict) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=job["weights_pth"])
    real, gen = uint8_batch(job["real_dir"]), uint8_batch(job["gen_dir"])
    metric.update(real, real=True)
    metric.update(gen, real=False)
    with torch.no_grad():
        features = metric.inception(real).double().numpy()
    return {"torchmetrics_fid": np.asarray(float(metric.compute())), "torchmetrics_real": features}


def clean_fid_reference(job: dict) -> dict:
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    files = sorted(Path(job["real_dir"]).glob("*.png"))
    return {"clean_fid_resized": np.stack([resize(np.asarray(Image.open(f).convert("RGB"))) for f in files])}


def maths_reference(job: dict) -> dict:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import _compute_fid

    with np.load(job["stats_npz"]) as s:
        mu1, s1, mu2, s2 = s["mu1"], s["sigma1"], s["mu2"], s["sigma2"]
    torchmetrics = _compute_fid(*(torch.from_numpy(a).double() for a in (mu1, s1, mu2, s2)))
    return {"maths_pytorch_fid": np.asarray(calculate_frechet_distance(mu1, s1, mu2, s2)),
            "maths_torchmetrics": np.asarray(float(torchmetrics))}


def main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    torch.set_grad_enabled(False)
    results = {}
    for reference in (pytorch_fid_reference, torchmetrics_reference, clean_fid_reference, maths_reference):
        results.update(reference(job))
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
