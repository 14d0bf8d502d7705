"""Dataset layouts users arrive with: kohya folders, HF imagefolders, mindone csv, plain folders + instance prompt.

Each test writes real images on disk and checks the exact (image, caption, repeats) list and the epoch length.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from msd_lora.data import transforms
from msd_lora.data.batching import BatchOrder
from msd_lora.data.dataset import CaptionedImageDataset, SkippedImagesWarning
from msd_lora.data.sources import IgnoredFoldersWarning, list_images
from msd_lora.errors import DatasetError


def image(path: Path, size=(16, 16), colour=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def triples(listing, root: Path) -> list[tuple[str, str, int]]:
    return [(str(r.path.relative_to(root)), r.caption, r.repeats) for r in listing.records]


def test_kohya_folders_repeats_sidecars_and_folder_captions(tmp_path: Path) -> None:
    image(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.caption").write_text("sks dog on grass\nsecond line ignored\n")
    image(tmp_path / "10_sks dog" / "b.jpg")
    (tmp_path / "10_sks dog" / "b.txt").write_text("sks dog, sleeping")
    image(tmp_path / "10_sks dog" / "c.webp")  # no caption file: the folder's name
    image(tmp_path / "2_my_cat" / "d.png")
    (tmp_path / "2_my_cat" / "notes.md").write_text("not an image")
    image(tmp_path / "samples" / "x.png")  # no repeat count: left out with a warning
    with pytest.warns(IgnoredFoldersWarning, match="samples"):
        listing = list_images(tmp_path)
    assert listing.kind == "kohya"
    assert triples(listing, tmp_path) == [
        ("10_sks dog/a.png", "sks dog on grass", 10), ("10_sks dog/b.jpg", "sks dog, sleeping", 10),
        ("10_sks dog/c.webp", "sks dog", 10), ("2_my_cat/d.png", "my_cat", 2)]
    assert listing.images_per_epoch == 32
    with pytest.warns(IgnoredFoldersWarning):
        ds = CaptionedImageDataset(tmp_path, 8)
    order = BatchOrder(ds.groups(), 4, seed=0)
    assert order.num_items == 32 and order.steps_per_epoch == 8  # kohya: ceil(32 / 4)
    # the explicit extension wins: b has no .caption file, so it falls back to the folder name
    with pytest.warns(IgnoredFoldersWarning):
        explicit = list_images(tmp_path, caption_extension=".caption")
    assert [r.caption for r in explicit.records][:3] == ["sks dog on grass", "sks dog", "sks dog"]


def test_imagefolder_jsonl_and_csv(tmp_path: Path) -> None:
    image(tmp_path / "train" / "a.png")
    image(tmp_path / "b.png")
    rows = [{"file_name": "train/a.png", "text": "a red square", "extra": 1}, {"file_name": "b.png", "text": "b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    listing = list_images(tmp_path)
    assert listing.kind == "imagefolder"
    assert triples(listing, tmp_path) == [("train/a.png", "a red square", 1), ("b.png", "b", 1)]
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 1: no caption column 'caption'.*caption_column"):
        list_images(tmp_path, caption_column="caption")
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text('file_name,caption\ntrain/a.png,"red, square"\nb.png,blue\n')
    listing = list_images(tmp_path, caption_column="caption")
    assert triples(listing, tmp_path) == [("train/a.png", "red, square", 1), ("b.png", "blue", 1)]


def test_mindone_csv_and_an_unquoted_comma_is_an_error(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "img_txt.csv").write_text('dir,text\na.png,"a dog, running"\n')
    listing = list_images(tmp_path)
    assert listing.kind == "mindone_csv" and triples(listing, tmp_path) == [("a.png", "a dog, running", 1)]
    (tmp_path / "img_txt.csv").write_text("dir,text\na.png,a dog, running\n")
    with pytest.raises(DatasetError, match=r"img_txt\.csv line 2: 3 fields but the header has 2.*quoted"):
        list_images(tmp_path)


def test_instance_prompt_folder(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.png"):
        image(tmp_path / name)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="folder of images without captions: set instance_prompt"):
        list_images(tmp_path)
    listing = list_images(tmp_path, instance_prompt="a photo of sks dog")
    assert listing.kind == "instance"
    assert triples(listing, tmp_path) == [("a.jpg", "a photo of sks dog", 1), ("b.png", "a photo of sks dog", 1)]


def test_ambiguous_layout_names_both_and_dataset_type_chooses(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "img_txt.csv").write_text("dir,text\na.png,csv caption\n")
    image(tmp_path / "5_dog" / "b.png")
    with pytest.raises(DatasetError, match=r"more than one dataset layout: mindone_csv.*kohya.*dataset_type"):
        list_images(tmp_path)
    assert list_images(tmp_path, dataset_type="mindone_csv").records[0].caption == "csv caption"
    assert list_images(tmp_path, dataset_type="kohya").records[0].repeats == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no dataset"):
        list_images(tmp_path / "empty")


def test_kohya_folder_paths_and_bad_counts(tmp_path: Path) -> None:
    (tmp_path / "0_dog").mkdir()
    image(tmp_path / "0_dog" / "a.png")
    with pytest.raises(DatasetError, match="repeat count.*at least 1"):
        list_images(tmp_path)


def test_sixteen_bit_png_is_scaled_not_white(tmp_path: Path) -> None:
    levels = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    Image.fromarray(levels).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    rgb = np.asarray(transforms.to_rgb(img))
    assert rgb.shape == (16, 16, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == round(65280 / 257) and 100 < rgb.mean() < 155


def test_small_images_and_bombs_are_skipped_with_a_count(tmp_path: Path, monkeypatch) -> None:
    image(tmp_path / "big.png", (40, 30))
    image(tmp_path / "small.png", (12, 30))
    image(tmp_path / "huge.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # 64x64 = 4096 pixels trips PIL's guard
    with pytest.warns(SkippedImagesWarning, match=r"skipped 2 of 3.*huge\.png \(decompression-bomb guard.*small\.png "
                                                  r"\(12x30, smaller than min_image_size 16\)"):
        ds = CaptionedImageDataset(tmp_path, 16, instance_prompt="x", min_image_size=16)
    assert [p.name for p in ds.image_paths] == ["big.png"]


def test_exif_rotation_swaps_the_size_used_for_buckets(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: displayed 20 wide, 40 tall
    img.save(tmp_path / "r.jpg", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = CaptionedImageDataset(tmp_path, 16, instance_prompt="x")
    assert ds.placements[0].resize == (16, 32)
    pixels, _ = ds.load(0)
    assert pixels.shape == (3, 16, 16)


def test_broken_listings_name_the_file_and_line(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 2: not a JSON object"):
        list_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 1: needs a \"file_name\" string"):
        list_images(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "../outside.png", "text": "x"}\n')
    with pytest.raises(DatasetError, match=r"leaves the dataset folder"):
        list_images(tmp_path)
    (tmp_path / "metadata.jsonl").unlink()
    image(tmp_path / "4_dog" / "b.png")
    (tmp_path / "4_dog" / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"caption file .*b\.txt is not UTF-8 text.*iconv"):
        list_images(tmp_path)
    with pytest.raises(DatasetError, match=r"dataset_type 'instance' needs instance_prompt"):
        list_images(tmp_path, dataset_type="instance")
