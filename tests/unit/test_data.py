"""Data pipeline: real tiny images and csv files on disk, numpy + PIL only."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msd_lora.data import transforms
from msd_lora.data.batching import BatchOrder, augmentation_rng
from msd_lora.data.buckets import square_placement
from msd_lora.data.dataset import CaptionedImageDataset, SkippedImagesWarning
from msd_lora.errors import DatasetError

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def write_csv(folder: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("dir", "text")) -> None:
    with open(folder / "img_txt.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def solid(size: tuple[int, int], colour, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good images of different sizes/formats, one caption with commas and quotes."""
    solid((12, 10), RED).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    solid((10, 16), BLUE).save(tmp_path / "sub" / "b.jpg", quality=95)
    solid((8, 8), GREEN).save(tmp_path / "c.png")
    write_csv(tmp_path, [("a.png", 'a red, "bright" square'), ("sub/b.jpg", "blue"), ("c.png", "green")])
    return tmp_path


def square_crop(img: Image.Image, size: int, rng=None) -> Image.Image:
    return img.crop(transforms.crop_box(img.size, (size, size), rng))


def load_quietly(*args, **kwargs) -> CaptionedImageDataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good folder must not warn
        return CaptionedImageDataset(*args, **kwargs)


# --- loading -------------------------------------------------------------------------------


def test_loads_shapes_ranges_and_captions(folder: Path) -> None:
    ds = load_quietly(folder, image_size=8)
    assert len(ds) == 3
    assert ds.captions == ['a red, "bright" square', "blue", "green"]
    assert ds.image_paths[1] == folder / "sub" / "b.jpg"
    assert ds.skipped == []
    for i, colour in enumerate((RED, BLUE, GREEN)):
        image, caption = ds.load(i)
        assert image.shape == (3, 8, 8) and image.dtype == np.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert caption == ds.captions[i]
        expected = np.asarray(colour, np.float32) / 127.5 - 1
        np.testing.assert_allclose(image.mean(axis=(1, 2)), expected, atol=0.05)


def test_resize_then_center_crop_keeps_the_middle_stripe(tmp_path: Path) -> None:
    # 40 wide x 32 tall, grey with a 16-px red vertical stripe in columns 12..27 (centred).
    pixels = np.full((32, 40, 3), 128, np.uint8)
    pixels[:, 12:28] = RED
    Image.fromarray(pixels).save(tmp_path / "stripe.png")
    write_csv(tmp_path, [("stripe.png", "stripe")])
    image, _ = load_quietly(tmp_path, image_size=16).load(0)
    out = transforms.to_uint8(image)
    assert out.shape == (16, 16, 3)
    # resized to 20x16 (stripe at 6..13), then 2 columns cut on each side -> stripe at 4..11
    assert (np.abs(out[:, 5:11].astype(int) - RED) <= 2).all()
    assert (np.abs(out[:, [0, 1, 14, 15]].astype(int) - 128) <= 2).all()


def test_center_crop_offsets_are_exact() -> None:
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:] = (np.arange(24) * 10)[None, :, None]
    cropped = np.asarray(square_crop(Image.fromarray(wide), 16))
    assert cropped.shape == (16, 16, 3)
    assert cropped[0, 0, 0] == 40 and cropped[0, -1, 0] == 190  # columns 4..19
    tall = Image.fromarray(wide.transpose(1, 0, 2).copy())
    assert np.asarray(square_crop(tall, 16))[0, 0, 0] == 40  # rows 4..19


def test_square_placement_resizes_the_short_side() -> None:
    assert square_placement(40, 32, 16).resize == (20, 16)
    assert square_placement(30, 45, 20).resize == (20, 30)
    assert square_placement(5, 7, 10).resize == (10, 14)  # upscales too


def test_random_crop_uses_rng_and_stays_in_bounds() -> None:
    wide = np.zeros((16, 24, 3), np.uint8)
    wide[:] = (np.arange(24) * 10)[None, :, None]
    img = Image.fromarray(wide)
    offsets = {int(np.asarray(square_crop(img, 16, np.random.default_rng(s)))[0, 0, 0]) // 10
               for s in range(30)}
    assert offsets <= set(range(9)) and len(offsets) > 3
    a = square_crop(img, 16, np.random.default_rng(7))
    b = square_crop(img, 16, np.random.default_rng(7))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_flip_is_reproducible_and_mirrors(tmp_path: Path) -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :3] = RED
    Image.fromarray(pixels).save(tmp_path / "x.png")
    write_csv(tmp_path, [("x.png", "x")])
    plain = load_quietly(tmp_path, image_size=8).load(0)[0]
    ds = load_quietly(tmp_path, image_size=8, flip=True)
    outs = [ds.load(0, augmentation_rng(0, 0, i))[0] for i in range(20)]
    flipped = [o for o in outs if not np.array_equal(o, plain)]
    assert 0 < len(flipped) < 20
    assert all(np.array_equal(o, plain[:, :, ::-1]) for o in flipped)
    assert np.array_equal(ds.load(0, augmentation_rng(0, 0, 3))[0], outs[3])
    with pytest.raises(ValueError, match="rng"):
        ds.load(0)


def test_rgba_grayscale_palette_cmyk_become_rgb(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (255, 0, 0, 255)  # opaque red left half
    rgba[:, 4:] = (255, 0, 0, 0)  # fully transparent right half -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    solid((8, 8), 100, "L").save(tmp_path / "grey.png")
    solid((8, 8), RED).convert("P").save(tmp_path / "pal.png")
    solid((8, 8), (255, 255, 0, 0), "CMYK").save(tmp_path / "cmyk.jpg")  # C+M -> blue
    write_csv(tmp_path, [(n, n) for n in ("rgba.png", "grey.png", "pal.png", "cmyk.jpg")])
    ds = load_quietly(tmp_path, image_size=8)
    out = [transforms.to_uint8(ds.load(i)[0]).astype(int) for i in range(4)]
    assert (out[0][:, :4] == RED).all() and (out[0][:, 4:] == 255).all()
    assert (out[1] == 100).all()
    assert (out[2] == RED).all()
    assert (np.abs(out[3] - BLUE) <= 3).all()


def test_to_uint8_inverts_to_array_and_clips() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    chw = transforms.to_array(Image.fromarray(pixels))
    assert chw.shape == (3, 5, 7)
    assert np.array_equal(transforms.to_uint8(chw), pixels)
    assert transforms.to_uint8(np.stack([chw, chw])).shape == (2, 5, 7, 3)
    assert transforms.to_uint8(np.full((3, 1, 1), 5.0))[0, 0].tolist() == [255] * 3
    assert transforms.to_uint8(np.full((3, 1, 1), -5.0))[0, 0].tolist() == [0] * 3


# --- bad input -----------------------------------------------------------------------------


def test_missing_data_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope.*does not exist.*img_txt\.csv"):
        CaptionedImageDataset(tmp_path / "nope", 8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="file is not a directory"):
        CaptionedImageDataset(tmp_path / "file", 8)


def test_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"holds no dataset: expected one of: mindone: img_txt\.csv"):
        CaptionedImageDataset(tmp_path, 8)


def test_missing_columns(folder: Path) -> None:
    write_csv(folder, [("a.png", "red")], header=("dir", "caption"))
    with pytest.raises(DatasetError, match=r"caption column 'text'.*found: \['dir', 'caption'\]"):
        CaptionedImageDataset(folder, 8)
    assert len(load_quietly(folder, 8, caption_column="caption")) == 1
    write_csv(folder, [("a.png", "red")], header=("file", "text"))
    with pytest.raises(DatasetError, match=r"image column 'dir'.*\['file', 'text'\]"):
        CaptionedImageDataset(folder, 8)


def test_empty_csv(folder: Path) -> None:
    write_csv(folder, [])
    with pytest.raises(DatasetError, match="img_txt.csv has a header but no rows"):
        CaptionedImageDataset(folder, 8)
    (folder / "img_txt.csv").write_text("")
    with pytest.raises(DatasetError, match="img_txt.csv is empty"):
        CaptionedImageDataset(folder, 8)


def test_empty_image_cell(folder: Path) -> None:
    write_csv(folder, [("a.png", "red"), ("", "nothing")])
    with pytest.raises(DatasetError, match="line 3"):
        CaptionedImageDataset(folder, 8)


@pytest.mark.parametrize("path", ["../outside.png", "sub/../../outside.png", "/etc/passwd", "C:\\x.png"])
def test_paths_must_stay_inside(folder: Path, path: str) -> None:
    write_csv(folder, [("a.png", "red"), (path, "escape")])
    with pytest.raises(DatasetError, match=r"line 3.*(absolute|leaves the dataset folder)"):
        CaptionedImageDataset(folder, 8)


def test_inner_dotdot_that_stays_inside_is_fine(folder: Path) -> None:
    write_csv(folder, [("sub/../a.png", "red")])
    assert load_quietly(folder, 8).image_paths == [folder / "a.png"]


def test_corrupt_and_missing_images_are_skipped_with_one_warning(folder: Path) -> None:
    (folder / "noise.png").write_bytes(np.random.default_rng(0).bytes(300))
    good = png_bytes(Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    write_csv(folder, [("a.png", "red"), ("noise.png", "n"), ("truncated.png", "t"),
                       ("gone.png", "g"), ("c.png", "green")])
    with pytest.warns(SkippedImagesWarning, match=r"skipped 3 of 5.*noise\.png.*truncated\.png.*gone\.png") as record:
        ds = CaptionedImageDataset(folder, 8)
    assert len(record) == 1
    assert len(ds) == 2 and ds.captions == ["red", "green"]
    assert [p.name for p, _ in ds.skipped] == ["noise.png", "truncated.png", "gone.png"]
    assert ds.skipped[2][1] == "file not found"
    assert ds.load(1)[0].shape == (3, 8, 8)


def test_all_images_bad_is_an_error(folder: Path) -> None:
    (folder / "noise.png").write_bytes(b"not an image at all")
    write_csv(folder, [("noise.png", "n"), ("gone.png", "g")])
    with pytest.raises(DatasetError, match=r"no usable images.*skipped 2 of 2.*noise\.png"):
        CaptionedImageDataset(folder, 8)


def test_file_that_passes_verify_but_fails_to_decode(folder: Path) -> None:
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    write_csv(folder, [("cut.jpg", "cut"), ("a.png", "red")])
    ds = load_quietly(folder, 8)  # JPEG verify() only reads headers
    with pytest.raises(DatasetError, match=r"cut\.jpg.*failed to decode"):
        ds.load(0)
    assert ds.load(1)[1] == "red"


# --- batching ------------------------------------------------------------------------------


def test_batch_order_is_deterministic_and_covers_each_item_once() -> None:
    order = BatchOrder(10, 3, seed=5)
    assert order.steps_per_epoch == 4  # ceil(10 / 3): the last batch is filled up from the same epoch
    batches = [order.batch(0, i) for i in range(4)]
    assert all(b.size == 3 for b in batches)
    assert set(np.concatenate(batches).tolist()) == set(range(10))
    same = BatchOrder(10, 3, seed=5)
    assert all(np.array_equal(b, same.batch(0, i)) for i, b in enumerate(batches))
    assert not np.array_equal(order.batches(0)[0][1], order.batches(1)[0][1])
    assert not np.array_equal(order.batch(0, 0), BatchOrder(10, 3, seed=6).batch(0, 0))


def test_batch_order_no_shuffle_fills_from_the_start() -> None:
    plain = BatchOrder(10, 4, seed=0, shuffle=False)
    assert [plain.batch(0, i).tolist() for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    with pytest.raises(IndexError):
        plain.batch(0, 3)
    assert plain.locate(7) == (2, 1)


def test_batch_is_independent_of_what_was_drawn_before() -> None:
    fresh = BatchOrder(50, 4, seed=3).batch(2, 5)
    used = BatchOrder(50, 4, seed=3)
    for epoch in range(4):
        for i in range(used.steps_per_epoch):
            used.batch(epoch, i)
    assert np.array_equal(used.batch(2, 5), fresh)


def test_fewer_items_than_a_batch_repeat_them() -> None:
    batch = BatchOrder(3, 8, seed=0).batch(0, 0)
    assert batch.size == 8 and set(batch.tolist()) == {0, 1, 2}


def test_augmentation_rng_is_reproducible_and_distinct() -> None:
    draw = lambda *key: augmentation_rng(*key).integers(0, 2**31, 4).tolist()  # noqa: E731
    assert draw(1, 2, 3) == draw(1, 2, 3)
    assert len({tuple(draw(*k)) for k in [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3)]}) == 4
    assert draw(1, 2, 0) != np.random.default_rng([1, 2]).integers(0, 2**31, 4).tolist()


def test_resumed_pipeline_reproduces_the_batch(folder: Path) -> None:
    ds = load_quietly(folder, image_size=6, random_crop=True, flip=True)
    order = BatchOrder(len(ds), 2, seed=9)

    def batch(epoch: int, index: int):
        rng = augmentation_rng(9, epoch, index)
        items = [ds.load(int(i), rng) for i in order.batch(epoch, index)]
        return np.stack([image for image, _ in items]), [caption for _, caption in items]

    first = [batch(e, 0) for e in range(3)]
    images, captions = batch(2, 0)
    assert images.shape == (2, 3, 6, 6) and images.dtype == np.float32 and len(captions) == 2
    assert np.array_equal(images, first[2][0]) and captions == first[2][1]
