"""The content measure recognises the tiny world's shapes and positions in rendered pictures, restyled or not, and
recognises nothing in pictures without them."""
from __future__ import annotations

import numpy as np
import pytest

from msd_lora.eval.content import content_rate, keeps_content, parse_prompt, recognise
from msd_lora.eval.tiny_world import POSITIONS, SHAPES, sepia
from tools.tiny_model.synthetic import COLOURS, Scene, render


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("position", list(POSITIONS))
def test_rendered_shapes_are_recognised_where_they_are(shape, position):
    rng = np.random.default_rng(hash((shape, position)) % 2**32)
    for colour, background in (("red", "blue"), ("white", "black"), ("yellow", "green")):
        scene = Scene(colour=colour, shape=shape, background=background, position=position, mention_position=True)
        found = recognise(render(scene, 32, rng))
        assert (found.shape, found.position) == (shape, position) and found.iou > 0.8
        assert keeps_content(render(scene, 32, rng), scene.caption + " in sks style")


def test_most_sepia_pictures_keep_their_content():
    """Sepia maps colour to brightness, so some pairs (red on blue) keep little contrast; the measure is colour-blind:
    it finds 90 % of these 120 (every pair of colours), against 100 % of the coloured ones."""
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    scenes = [Scene(names[i % 8], SHAPES[i % 3], names[(i + 1 + i // 8) % 8], list(POSITIONS)[i % 5], True)
              for i in range(120)]
    images = [sepia(render(scene, 32, rng)) for scene in scenes]
    assert content_rate(images, [scene.caption for scene in scenes]) >= 0.85


def test_pictures_without_the_prompted_shape_do_not_count():
    rng = np.random.default_rng(1)
    flat = np.full((32, 32, 3), 120, np.uint8)
    noise = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    ring = render(Scene("red", "circle", "blue", "center", False), 32, rng)
    ring[12:20, 12:20] = (40, 70, 220)  # a hole: no longer a filled circle
    square = render(Scene("red", "square", "blue", "left", True), 32, rng)
    assert recognise(flat) is None
    assert not keeps_content(noise, "a red circle on a blue background")
    assert not keeps_content(square, "a red circle on a blue background")  # another shape
    assert not keeps_content(square, "a red square on the right on a blue background")  # another place
    assert recognise(ring).iou < recognise(render(Scene("red", "circle", "blue", "center", False), 32, rng)).iou


def test_prompts_are_parsed_for_shape_and_position():
    assert parse_prompt("a red circle on a blue background in sks style").shape == "circle"
    assert parse_prompt("a yellow triangle at the top on a blue background").position == "top"
    assert parse_prompt("a photo of a dog") is None
    with pytest.raises(ValueError, match="names none of the tiny world's shapes"):
        keeps_content(np.zeros((32, 32, 3), np.uint8), "a photo of a dog")


def test_compare_samples_reports_content_beside_style(tmp_path, capsys):
    import json

    from PIL import Image

    from tools.compare_samples import main

    rng = np.random.default_rng(2)
    folder, reference = tmp_path / "samples", tmp_path / "reference"
    (folder / "samples").mkdir(parents=True)
    reference.mkdir()
    scenes = [Scene("red", "circle", "blue", "left", True), Scene("white", "square", "black", "top", True)]
    lines = []
    for i, scene in enumerate(scenes):
        Image.fromarray(render(scene, 32, rng)).save(folder / "samples" / f"{i:05d}.png")
        Image.fromarray(sepia(render(scene, 32, rng))).save(reference / f"{i}.png")
        lines.append(json.dumps({"file": f"samples/{i:05d}.png", "prompt": scene.caption}))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--reference", str(reference), "--samples", str(folder)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[-2:] == ["content", "kept"]
    assert rows[1].endswith("-") and rows[2].endswith("100%")  # the reference has no prompts; both samples keep theirs


def test_content_ceiling_tells_which_prompts_the_style_can_show(tmp_path, capsys):
    """tools/tiny_model/content_ceiling.py on pictures of two prompts: per prompt, the share kept as drawn, restyled
    and restyled then decoded by the embedded tiny model's autoencoder."""
    import json

    from PIL import Image

    from tools.tiny_model.content_ceiling import main

    rng = np.random.default_rng(3)
    (tmp_path / "samples").mkdir()
    scenes = [Scene("white", "circle", "blue", "left", True), Scene("yellow", "triangle", "black", "top", True)] * 2
    lines = []
    for i, scene in enumerate(scenes):
        Image.fromarray(render(scene, 32, rng)).save(tmp_path / "samples" / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"samples/{i:05d}.png", "prompt": scene.caption}))
    (tmp_path / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--samples", str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[-4:] == ["drawn", "restyled", "+", "decoded"]
    assert [row.split()[-3:] for row in rows[1:]] == [["100%", "100%", "100%"]] * 2
    assert main(["--samples", str(tmp_path / "samples")]) == 2  # not a folder text_to_image.py wrote


def test_drawn_and_prompted_colours():
    """The subject's cyan is told apart from every palette colour, including the nearest ones (blue, white, green)."""
    from msd_lora.eval.tiny_world import COLOURS as PALETTE
    from msd_lora.eval.tiny_world import SUBJECT, drawn_colour, prompted_colour, render_subject

    rng = np.random.default_rng(4)
    assert all(drawn_colour(render_subject(32, PALETTE["black"], rng)) == SUBJECT for _ in range(10))
    for colour in ("blue", "white", "green", "purple"):
        scene = Scene(colour=colour, shape="circle", background="black", position="center", mention_position=False)
        assert drawn_colour(render(scene, 32, rng)) == colour
    assert drawn_colour(np.full((32, 32, 3), 90, np.uint8)) is None  # nothing stands out
    assert prompted_colour("a blue circle on a black background") == "blue"
    assert prompted_colour("a sks circle on a black background") is None  # the background's colour is not asked


def test_subject_shown_reports_per_prompt_and_draws_the_grid(tmp_path, capsys):
    import json

    from PIL import Image

    from msd_lora.eval.tiny_world import COLOURS as PALETTE
    from msd_lora.eval.tiny_world import render_subject
    from tools.subject_shown import main

    rng = np.random.default_rng(5)
    (tmp_path / "run" / "samples").mkdir(parents=True)
    blue = Scene(colour="blue", shape="circle", background="black", position="center", mention_position=False)
    pictures = [("a sks circle on a black background", render_subject(32, PALETTE["black"], rng))] * 3 + [
        ("a sks circle on a black background", render(blue, 32, rng)),
        ("a blue circle on a black background", render(blue, 32, rng)),
        ("a blue circle on a black background", render_subject(32, PALETTE["black"], rng))]
    lines = []
    for i, (prompt, image) in enumerate(pictures):
        Image.fromarray(image).save(tmp_path / "run" / "samples" / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"samples/{i:05d}.png", "prompt": prompt}))
    (tmp_path / "run" / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "base" / "samples").mkdir(parents=True)  # the same prompts, every pixel 10 levels brighter
    for i, (_, image) in enumerate(pictures):
        Image.fromarray(image + np.uint8(10)).save(tmp_path / "base" / "samples" / f"{i:05d}.png")
    (tmp_path / "base" / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["--samples", str(tmp_path / "run"), "--grid", str(tmp_path / "grid.png"), "--upscale", "1",
                 "--base", str(tmp_path / "base")]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [row.split()[-4:] for row in rows[1:3]] == [["4", "75%", "-", "10.0"], ["2", "50%", "50%", "10.0"]]
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 * (14 + 32), 4 * 32, 3)  # a labelled row per prompt, as wide as the longest
    assert main(["--samples", str(tmp_path)]) == 2  # not a folder text_to_image.py wrote
