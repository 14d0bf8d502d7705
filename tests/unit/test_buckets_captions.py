"""Aspect-ratio buckets, bucketed batch order, caption options, feature caches and background loading."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msd_lora.data.batching import BatchOrder, augmentation_rng
from msd_lora.data.buckets import BucketSettings, assign, bucket_table
from msd_lora.data.cache import FeatureCache, weights_identity
from msd_lora.data.captions import CaptionOptions
from msd_lora.data.dataset import CaptionedImageDataset
from msd_lora.data.loader import BatchMaker, Prefetcher

SD512 = BucketSettings(512, 256, 1024, 64)


def test_bucket_table_is_kohyas_for_512() -> None:
    assert bucket_table(SD512) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)]


def test_assignment_by_nearest_aspect_ratio_and_cover_resize() -> None:
    table = bucket_table(SD512)
    wide = assign(1600, 900, SD512, table)  # 1.78 -> 704x320 (2.2)? no: 640x384 (1.67) is nearest
    assert wide.bucket == (640, 384) and wide.resize == (683, 384)
    assert assign(1000, 1000, SD512, table).bucket == (512, 512)
    tall = assign(300, 1000, SD512, table)  # 0.3 -> 256x832 (0.31)
    assert tall.bucket == (256, 832) and tall.resize == (256, 853)
    small = assign(100, 75, SD512, table)  # upscaled to cover 576x448
    assert small.bucket == (576, 448) and small.resize == (597, 448)


def test_no_upscale_keeps_small_images_and_shrinks_large_ones() -> None:
    settings = BucketSettings(512, 256, 1024, 64, no_upscale=True)
    small = assign(300, 200, settings, [])
    assert small.bucket == (256, 192) and small.resize == (300, 200)  # kohya's example: cropped, not resized
    large = assign(2000, 1000, settings, [])
    assert large.resize[0] * large.resize[1] <= 512 * 512 * 1.02
    assert large.bucket == (large.resize[0] // 64 * 64, large.resize[1] // 64 * 64)
    upscaled = assign(300, 200, BucketSettings(512, 256, 1024, 64), bucket_table(SD512))
    assert upscaled.resize[0] > 300  # without no_upscale the same image is enlarged


def test_bucket_settings_checks() -> None:
    with pytest.raises(ValueError, match="bucket_reso_steps 32 must be a multiple of 64"):
        BucketSettings(512, 256, 1024, 32).check(64)
    with pytest.raises(ValueError, match="image_size 128 must lie between"):
        BucketSettings(128, 256, 1024, 64).check(64)
    with pytest.raises(ValueError, match="image_size 520 must be a multiple of 64 with buckets"):
        BucketSettings(520, 256, 1024, 64).check(64)
    with pytest.raises(ValueError, match="min_bucket_reso 200 and max_bucket_reso 1024 must be multiples of"):
        BucketSettings(512, 200, 1024, 64).check(64)


def write_images(folder: Path, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


SIZES = [(64, 64), (66, 62), (96, 48), (100, 50), (48, 96), (40, 80), (80, 64), (60, 48), (32, 32), (100, 20), (20, 96)]
SMALL = BucketSettings(48, 16, 96, 16)


def test_every_batch_is_one_bucket_and_the_order_resumes(tmp_path: Path) -> None:
    write_images(tmp_path, SIZES)
    ds = CaptionedImageDataset(tmp_path, 48, instance_prompt="x", buckets=SMALL)
    assert len(ds.buckets) >= 4
    order = BatchOrder(ds.groups(), 2, seed=7)
    assert order.steps_per_epoch == sum(-(-n // 2) for n in map(len, ds.groups()))
    make = BatchMaker(ds, order, CaptionOptions(), seed=7)
    for step in range(2 * order.steps_per_epoch):
        batch = make(step)
        assert {ds.placements[i].bucket for i in batch.items} == {batch.bucket}
        assert batch.pixels.shape == (2, 3, batch.bucket[1], batch.bucket[0])
    seen = sorted(int(i) for s in range(order.steps_per_epoch) for i in make(s).items)
    assert set(seen) == set(range(len(ds)))
    resumed = BatchMaker(ds, BatchOrder(ds.groups(), 2, seed=7), CaptionOptions(), seed=7)
    step = order.steps_per_epoch + 3  # inside the second epoch
    assert np.array_equal(resumed(step).pixels, make(step).pixels)


def test_captions_prefix_dropout_and_shuffle_keep_tokens() -> None:
    options = CaptionOptions(prefix="sks style,", suffix="4k")
    assert options.apply("a dog, grass", None) == "sks style, a dog, grass 4k"
    shuffle = CaptionOptions(shuffle=True, keep_tokens=1)
    outs = {shuffle.apply("sks, a, b, c, d", np.random.default_rng(s)) for s in range(40)}
    assert all(o.startswith("sks, ") for o in outs) and len(outs) > 5
    assert all(sorted(o.split(", ")) == ["a", "b", "c", "d", "sks"] for o in outs)
    dropout = CaptionOptions(dropout_rate=0.25)
    dropped = [dropout.apply("x", augmentation_rng(1, 0, i, 0)) == "" for i in range(2000)]
    assert 0.2 < np.mean(dropped) < 0.3
    assert CaptionOptions(shuffle=True, separator=";").apply("a;b", np.random.default_rng(0)) in ("a; b", "b; a")


def test_prefetching_workers_give_identical_batches(tmp_path: Path) -> None:
    write_images(tmp_path, SIZES)
    ds = CaptionedImageDataset(tmp_path, 48, instance_prompt="a, b, c", buckets=SMALL, random_crop=True, flip=True)
    order = BatchOrder(ds.groups(), 2, seed=3)
    make = BatchMaker(ds, order, CaptionOptions(shuffle=True, dropout_rate=0.3), seed=3)
    inline = [make(s) for s in range(12)]
    with Prefetcher(make, workers=3) as ahead:
        threaded = [ahead.get(s) for s in (0, 1, 2, 5, 6, 7, 8, 9, 10, 11)]
    for got, want in zip(threaded, [inline[s] for s in (0, 1, 2, 5, 6, 7, 8, 9, 10, 11)]):
        assert np.array_equal(got.pixels, want.pixels) and got.captions == want.captions and got.crops == want.crops
    assert np.array_equal(ahead.get(4).pixels, inline[4].pixels)  # usable after close: the threads start again
    ahead.close()


def test_feature_cache_keys_and_disk_entries(tmp_path: Path) -> None:
    disk = FeatureCache("latents", tmp_path)
    key = {"vae": "v1", "image": "abc", "box": [0, 0, 8, 8]}
    assert disk.get(key) is None
    disk.put(key, {"mean": np.ones((4, 1, 1)), "std": np.zeros((4, 1, 1))})
    again = FeatureCache("latents", tmp_path)
    assert np.array_equal(again.get(key)["mean"], np.ones((4, 1, 1)))
    assert again.get({**key, "vae": "v2"}) is None  # another model never reads it
    # a file whose recorded key differs (copied over, or a hash collision) is not used
    path = again._path(again.key_text(key))
    other = again._path(again.key_text({**key, "image": "zzz"}))
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(path.read_bytes())
    assert again.get({**key, "image": "zzz"}) is None
    path.write_bytes(b"torn")
    assert again.get(key) is None
    memory = FeatureCache("text")
    memory.put({"ids": [1, 2]}, {"states": np.zeros((2, 3))})
    assert {"ids": [1, 2]} in memory and {"ids": [1, 3]} not in memory


def test_weights_identity_sees_any_change() -> None:
    state = {"a": np.zeros((2, 2), np.float32), "b": np.ones(3, np.float32)}
    same = {k: v.copy() for k, v in state.items()}
    assert weights_identity(state) == weights_identity(same)
    same["b"][1] = 1.0001
    assert weights_identity(state) != weights_identity(same)
    assert weights_identity(state) != weights_identity({"a": state["a"].astype(np.float16), "b": state["b"]})
