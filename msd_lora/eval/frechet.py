"""Feature statistics and the Fréchet distance between two Gaussians, in float64.

    FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The last term is computed without a matrix square root of S1 S2 (no scipy `sqrtm`). For any factors with
S1 = F1 F1^T and S2 = F2 F2^T, the matrix A = F1^T F2 has A A^T = F1^T S2 F1, whose non-zero eigenvalues are those
of S2 S1, hence of S1 S2 (real and >= 0: S1 S2 is similar to S1^(1/2) S2 S1^(1/2)). So

    tr((S1 S2)^(1/2)) = sum_i sigma_i(F1^T F2)     (the nuclear norm, from an SVD)

The factors are the centred features / sqrt(n - 1) when a set has no more images than feature dimensions (exact,
and the covariance is never factored), else the Cholesky factor of the covariance (the symmetric eigen square root
if Cholesky finds it singular). Everything is real and symmetric where it matters: no complex round-off to discard,
no eps added to the diagonal for singular covariances (pytorch-fid's fallback), and singular values carry an absolute
error of about machine-eps * |A| rather than the sqrt(eps) that square roots of near-zero eigenvalues would give. So a
set's distance to itself is 0 to rounding even when its covariance is rank-deficient, and on well-conditioned
statistics the result equals pytorch-fid's `sqrtm` route to rounding (tests/eval/test_frechet.py: 1e-6 relative).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from msd_lora.errors import StatisticsError


@dataclass
class Gaussian:
    """Mean and covariance of a feature set; `factor` (D, k) with factor @ factor.T == sigma when known."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int = -1  # -1: unknown (statistics read from a file that does not say)
    factor: np.ndarray | None = None


def feature_statistics(features: np.ndarray, what: str = "feature set") -> Gaussian:
    """Mean and unbiased covariance (ddof=1, as pytorch-fid's `np.cov(rowvar=False)`) of (N, D) features."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise StatisticsError(f"{what}: features must be (N, D), got shape {features.shape}")
    n, dims = features.shape
    if n < 2:
        raise StatisticsError(f"{what}: FID needs at least 2 images (the covariance of {n} image is undefined); "
                              f"give more images")
    mu = features.mean(axis=0)
    factor = (features - mu).T / np.sqrt(n - 1)
    return Gaussian(mu, factor @ factor.T, n, factor if n <= dims else None)


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues -> 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def covariance_factor(gaussian: Gaussian) -> np.ndarray:
    """F with F @ F.T == sigma: the stored factor, else Cholesky, else the eigen square root (singular sigma)."""
    if gaussian.factor is not None:
        return gaussian.factor
    try:
        return np.linalg.cholesky(gaussian.sigma)
    except np.linalg.LinAlgError:
        return psd_sqrt(gaussian.sigma)


def trace_sqrt_product(g1: Gaussian, g2: Gaussian) -> float:
    """tr((sigma1 sigma2)^(1/2)) as the nuclear norm of F1^T F2."""
    product = covariance_factor(g1).T @ covariance_factor(g2)
    return float(np.linalg.svd(product, compute_uv=False).sum())


def gaussian_distance(g1: Gaussian, g2: Gaussian) -> float:
    """Fréchet distance between N(g1.mu, g1.sigma) and N(g2.mu, g2.sigma)."""
    mu1, mu2 = np.asarray(g1.mu, np.float64), np.asarray(g2.mu, np.float64)
    if mu1.ndim != 1 or mu1.shape != mu2.shape or g1.sigma.shape != (mu1.size,) * 2 or g2.sigma.shape != g1.sigma.shape:
        raise StatisticsError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                              f"sigma {g1.sigma.shape} vs {g2.sigma.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(g1.sigma) + np.trace(g2.sigma) - 2.0 * trace_sqrt_product(g1, g2))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance from means and covariances (pytorch-fid's `calculate_frechet_distance` signature)."""
    def gaussian(mu, sigma):
        return Gaussian(np.atleast_1d(np.asarray(mu, np.float64)), np.atleast_2d(np.asarray(sigma, np.float64)))

    return gaussian_distance(gaussian(mu1, sigma1), gaussian(mu2, sigma2))


def check_statistics_target(path: str | Path) -> Path:
    """Where statistics will be saved: an .npz name (np.savez would silently add the suffix)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise StatisticsError(f"--save_stats {path}: the statistics file must end in .npz")
    return path


def save_statistics(path: str | Path, gaussian: Gaussian, **info: str | int) -> None:
    """An .npz in pytorch-fid's layout (`mu`, `sigma`), plus small descriptive entries (resize, num_images, ...)
    and, for sets of at most as many images as dimensions, the covariance factor (exact FIDs when reused)."""
    from msd_lora.files.atomic import atomic_path

    path = check_statistics_target(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            factor = {} if gaussian.factor is None else {"factor": gaussian.factor}
            np.savez_compressed(f, mu=gaussian.mu, sigma=gaussian.sigma, num_images=gaussian.num_images, **factor,
                                **{k: np.asarray(v) for k, v in info.items()})


def load_statistics(path: str | Path) -> tuple[Gaussian, dict[str, str]]:
    """The Gaussian and its info entries from an .npz with `mu` and `sigma` (pytorch-fid's layout or ours)."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise StatisticsError(f"statistics file {path} not found")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise StatisticsError(f"statistics file {path} cannot be read as an .npz ({err}): it is truncated or not "
                              f"a statistics file; save it again with --save_stats") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise StatisticsError(f"{path} is not an FID statistics file: a single array, not an .npz with mu and sigma")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise StatisticsError(f"{path} is not an FID statistics file: no {' / '.join(missing)} "
                                  f"(it has {', '.join(data.files) or 'nothing'})")
        info = {k: str(data[k]) for k in data.files if k not in ("mu", "sigma", "factor")}
        factor = data["factor"].astype(np.float64) if "factor" in data.files else None
        gaussian = Gaussian(data["mu"].astype(np.float64), data["sigma"].astype(np.float64),
                            int(info.get("num_images", -1)), factor)
    return gaussian, info
