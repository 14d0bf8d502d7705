"""The Fréchet distance and feature statistics against independent numpy/scipy computations (no framework)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from msd_lora.errors import StatisticsError
from msd_lora.eval.frechet import (
    Gaussian,
    feature_statistics,
    frechet_distance,
    gaussian_distance,
    load_statistics,
    save_statistics,
)


def features(n: int, dims: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0, 1, (dims, dims)) / np.sqrt(dims)  # correlated features of unequal scales
    return (rng.normal(0, 1, (n, dims)) * rng.uniform(0.2, 3.0, dims)) @ mixing + shift


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation, independent of ours: np.cov and scipy.linalg.sqrtm of the product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("n, dims", [(400, 64), (12, 256)], ids=["full-rank", "rank-deficient"])
def test_distance_of_a_set_to_itself_is_zero(n, dims):
    g = feature_statistics(features(n, dims, seed=0))
    assert abs(gaussian_distance(g, g)) <= 1e-6
    assert abs(frechet_distance(g.mu, g.sigma, g.mu, g.sigma)) <= 1e-6  # covariance-only route


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_scipy_sqrtm_on_random_features(seed):
    x, y = features(500, 48, seed), features(300, 48, seed + 10, shift=0.3)
    want = scipy_fid(x, y)
    gx, gy = feature_statistics(x), feature_statistics(y)
    assert abs(gaussian_distance(gx, gy) - want) <= 1e-6 * abs(want)
    assert abs(frechet_distance(gx.mu, gx.sigma, gy.mu, gy.sigma) - want) <= 1e-6 * abs(want)


def test_feature_route_equals_covariance_route_when_rank_deficient():
    """Fewer images than dimensions: centred-feature factors and covariance factors give the same trace term (the
    covariance route loses a few digits on a singular covariance, which is why features are used when known)."""
    x, y = features(10, 128, 3), features(15, 128, 4, shift=0.5)
    gx, gy = feature_statistics(x), feature_statistics(y)
    assert gx.factor is not None and gy.factor is not None
    by_covariance = frechet_distance(gx.mu, gx.sigma, gy.mu, gy.sigma)
    assert gaussian_distance(gx, gy) == pytest.approx(by_covariance, rel=1e-7)


def test_statistics_are_pytorch_fids():
    x = features(30, 8, 5)
    g = feature_statistics(x)
    np.testing.assert_allclose(g.mu, np.mean(x, axis=0), rtol=1e-12)
    np.testing.assert_allclose(g.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)  # ddof=1
    assert g.num_images == 30


def test_fewer_than_two_images_is_an_error():
    with pytest.raises(StatisticsError, match="at least 2 images"):
        feature_statistics(np.ones((1, 2048)), "--gen_dir x")


def test_mismatched_statistics_are_an_error():
    with pytest.raises(StatisticsError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_file_round_trip_and_pytorch_fid_layout(tmp_path):
    g = feature_statistics(features(20, 16, 6))
    save_statistics(tmp_path / "real.npz", g, resize="bilinear")
    loaded, info = load_statistics(tmp_path / "real.npz")
    np.testing.assert_array_equal(loaded.mu, g.mu)
    np.testing.assert_array_equal(loaded.sigma, g.sigma)
    assert info == {"num_images": "20", "resize": "bilinear"} and loaded.num_images == 20
    np.savez(tmp_path / "pytorch_fid.npz", mu=g.mu, sigma=g.sigma)  # what pytorch-fid --save-stats writes
    plain, info = load_statistics(tmp_path / "pytorch_fid.npz")
    assert info == {} and plain.num_images == -1
    assert gaussian_distance(plain, loaded) == pytest.approx(0.0, abs=1e-6)


def test_bad_stats_files(tmp_path):
    with pytest.raises(StatisticsError, match="not found"):
        load_statistics(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", m=np.zeros(2))
    with pytest.raises(StatisticsError, match="no mu / sigma"):
        load_statistics(tmp_path / "other.npz")
    with pytest.raises(StatisticsError, match="must end in .npz"):
        save_statistics(tmp_path / "stats.txt", Gaussian(np.zeros(2), np.eye(2)))


def test_unreadable_stats_files_are_named(tmp_path):
    g = feature_statistics(features(20, 16, 6))
    save_statistics(tmp_path / "real.npz", g)
    data = (tmp_path / "real.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npz").write_text("mu, sigma\n")
    for name in ("truncated.npz", "empty.npz", "text.npz"):
        with pytest.raises(StatisticsError, match=rf"statistics file .*{name} cannot be read as an .npz"):
            load_statistics(tmp_path / name)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(StatisticsError, match="array.npy is not an FID statistics file: a single array"):
        load_statistics(tmp_path / "array.npy")
