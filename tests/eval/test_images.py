"""Image discovery and reading: accepted extensions, order, skipped files, conversions, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msd_lora.errors import ImageInputError
from msd_lora.eval.images import ConversionLog, find_images, read_rgb, sample_folder


def test_recursive_sorted_and_non_images_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/00002.jpg", "00001.PNG", "00000.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "img_txt.csv").write_text("dir,text\n")
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".hidden" / "x.png")
    found = find_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found.files] == ["00000.png", "00001.PNG", "b/00002.jpg"]
    message = found.describe_skipped()
    assert "skipped 2 non-image file(s) (img_txt.csv, notes.txt)" in message and ".png, .jpg" in message


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(ImageInputError, match=r"--gen_dir .* has no images \(.png, .jpg.*\(it is empty\)"):
        find_images(tmp_path, "--gen_dir")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ImageInputError, match="has no images .* it holds 1 other file"):
        find_images(tmp_path)
    with pytest.raises(ImageInputError, match="does not exist"):
        find_images(tmp_path / "nope")


def test_single_image_file_and_non_image_file(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "one.png")
    assert find_images(tmp_path / "one.png").files == [tmp_path / "one.png"]
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ImageInputError, match="is not an image file"):
        find_images(tmp_path / "x.json")


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageInputError, match="broken.png is not a readable image"):
        read_rgb(tmp_path / "broken.png")


def test_grayscale_rgba_and_palette_become_rgb_and_are_reported(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.dstack([np.full((8, 8), c, np.uint8) for c in (10, 20, 30, 0)])  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).convert("P").save(tmp_path / "palette.png")
    log = ConversionLog()
    pixels = {}
    for name in ("gray", "rgba", "palette"):
        pixels[name], mode = read_rgb(tmp_path / f"{name}.png")
        log.add(mode)
        assert pixels[name].shape == (8, 8, 3) and pixels[name].dtype == np.uint8
    np.testing.assert_array_equal(pixels["gray"], np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(pixels["rgba"][0, 0], [10, 20, 30])  # alpha dropped, not composited
    summary = log.summary(tmp_path)
    assert "converted to RGB" in summary and "1 L (grayscale, replicated to 3 channels)" in summary
    assert "1 RGBA (alpha dropped, not composited)" in summary and "1 P (palette" in summary


def test_text_to_image_output_folder_means_its_samples(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples.jsonl").write_text("")
    assert sample_folder(tmp_path) == tmp_path / "samples"
    assert sample_folder(tmp_path / "samples") == tmp_path / "samples"


def test_numbered_files_keep_their_numeric_order_past_five_digits(tmp_path):
    """text_to_image.py names images {count:05d}.png: 100000.png comes after 99999.png, not before 10001.png."""
    numbers = (0, 9, 10, 9999, 10000, 10001, 99999, 100000, 100001, 123456)
    for n in numbers:
        (tmp_path / f"{n:05d}.png").write_bytes(b"")  # only the names matter here
    (tmp_path / "sub2").mkdir()
    (tmp_path / "sub10").mkdir()
    (tmp_path / "sub10" / "a.png").write_bytes(b"")
    (tmp_path / "sub2" / "a.png").write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path).files]
    assert found == [f"{n:05d}.png" for n in numbers] + ["sub2/a.png", "sub10/a.png"]
