"""The demo world's scene generator: seeded, rendered where the words say, answers true to the image, Parquet out."""

from __future__ import annotations

import io
import random
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.lab import scenes
from pipeline.lab.scenes import Scene, Shape

NUMBER_ANSWERS = {1: "one.", 2: "two.", 3: "three."}


def sample_scenes(count: int, seed: int = 0) -> list[Scene]:
    rng = random.Random(seed)
    return [scenes.random_scene(rng) for _ in range(count)]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+|[^\w\s]", text))


def third_columns(position: str, size: int) -> range:
    """The pixel columns whose centres fall in the position's third of the image."""
    index = scenes.POSITIONS.index(position)
    return range(round(index * size / 3), round((index + 1) * size / 3))


def test_same_seed_same_data_and_different_seeds_differ():
    assert sample_scenes(50, seed=1) == sample_scenes(50, seed=1)
    assert sample_scenes(50, seed=1) != sample_scenes(50, seed=2)
    scene = sample_scenes(1)[0]
    assert scenes.instructions(scene, random.Random(7)) == scenes.instructions(scene, random.Random(7))
    for kind in scenes.RECORD_KINDS:
        assert scenes.records(10, 3, kind) == scenes.records(10, 3, kind)
        assert [r["image"] for r in scenes.records(10, 3, kind)] != [r["image"] for r in scenes.records(10, 4, kind)]
    assert scenes.text_records(20, 3) == scenes.text_records(20, 3)
    assert scenes.text_records(20, 3) != scenes.text_records(20, 4)
    assert np.array_equal(np.asarray(scenes.render(scene)), np.asarray(scenes.render(scene)))


def test_random_scenes_follow_the_rules():
    generated = sample_scenes(300)
    assert {len(s.shapes) for s in generated} == {1, 2, 3}
    for scene in generated:
        positions = [s.position for s in scene.shapes]
        assert positions == sorted(set(positions), key=scenes.POSITIONS.index)  # distinct, left to right
        assert scene.background in scenes.BACKGROUNDS
        assert all(s.kind in scenes.KINDS and s.colour in scenes.COLOURS and s.size in scenes.SIZES
                   for s in scene.shapes)
    assert not set(scenes.BACKGROUNDS.values()) & set(scenes.COLOURS.values())
    assert not set(scenes.BACKGROUNDS) & set(scenes.COLOURS)


@pytest.mark.parametrize("size", [32, 48])
def test_each_shape_is_painted_in_its_own_third(size):
    for scene in sample_scenes(100, seed=size):
        image = scenes.render(scene, size)
        assert image.mode == "RGB" and image.size == (size, size)
        pixels = np.asarray(image)
        by_position = {s.position: s for s in scene.shapes}
        for position in scenes.POSITIONS:
            third = pixels[:, third_columns(position, size)].reshape(-1, 3)
            painted = {tuple(p) for p in third.tolist()} - {scenes.BACKGROUNDS[scene.background]}
            expected = {scenes.COLOURS[by_position[position].colour]} if position in by_position else set()
            assert painted == expected, (scene, position)


@pytest.mark.parametrize("kind", scenes.KINDS)
def test_large_shapes_cover_much_more_than_small_ones(kind):
    def area(size: str) -> int:
        image = scenes.render(Scene("white", (Shape(kind, "green", size, "middle"),)))
        return int(np.all(np.asarray(image) == scenes.COLOURS["green"], axis=-1).sum())

    assert area("large") >= 2.5 * area("small") > 0


def test_kinds_render_differently():
    images = [np.asarray(scenes.render(Scene("black", (Shape(k, "yellow", "large", "left"),)))) for k in scenes.KINDS]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])


def test_every_answer_is_true_to_its_scene():
    rng = random.Random(11)
    asked, yes_no = set(), set()
    for scene in sample_scenes(300, seed=5):
        by_position = {s.position: s for s in scene.shapes}
        colours = {s.colour for s in scene.shapes}
        for prompt, answer in scenes.instructions(scene, rng):
            if prompt == "Describe the image.":
                asked.add("describe")
                assert answer == scenes.caption(scene)
            elif prompt == "How many shapes are there?":
                asked.add("count")
                assert answer == NUMBER_ANSWERS[len(scene.shapes)]
            elif match := re.fullmatch(r"What colour is the (\w+)\?", prompt):
                asked.add("colour")
                named = [s for s in scene.shapes if s.kind == match[1]]
                assert len(named) == 1 and answer == f"{named[0].colour}."
            elif match := re.fullmatch(r"What shape is (?:on the|in the) (\w+)\?", prompt):
                asked.add("position")
                shape = by_position[match[1]]
                assert answer == f"a {shape.size} {shape.colour} {shape.kind}."
            elif match := re.fullmatch(r"Is there (a|an) (\w+) shape\?", prompt):
                asked.add("has colour")
                assert match[1] == ("an" if match[2] == "orange" else "a")
                assert answer == ("yes." if match[2] in colours else "no.")
                yes_no.add(answer)
            else:
                pytest.fail(f"unexpected prompt {prompt!r}")
    assert asked == {"describe", "count", "colour", "position", "has colour"}
    assert yes_no == {"yes.", "no."}


def test_colour_question_only_names_a_kind_present_once():
    twice = Scene("grey", (Shape("circle", "red", "small", "left"), Shape("square", "blue", "large", "middle"),
                           Shape("circle", "green", "large", "right")))
    thrice = Scene("grey", tuple(Shape("circle", c, "small", p) for c, p in zip(scenes.COLOURS, scenes.POSITIONS)))
    rng = random.Random(0)
    for _ in range(30):
        colour_prompts = [p for p, _ in scenes.instructions(twice, rng) if p.startswith("What colour")]
        assert colour_prompts == ["What colour is the square?"]
        assert not [p for p, _ in scenes.instructions(thrice, rng) if p.startswith("What colour")]


def test_caption_of_one_shape_names_everything():
    text = scenes.caption(Scene("beige", (Shape("triangle", "purple", "large", "right"),)))
    assert text == "a large purple triangle on the right, on a beige background."
    two = Scene("grey", (Shape("circle", "red", "small", "left"), Shape("square", "blue", "large", "right")))
    assert scenes.caption(two) == ("a small red circle on the left and a large blue square on the right,"
                                   " on a grey background.")


def test_records_round_trip_through_parquet(tmp_path):
    for kind in scenes.RECORD_KINDS:
        rows = scenes.records(12, 9, kind, image_size=40)
        path = scenes.write_parquet(rows, tmp_path / "nested" / kind / "data.parquet")
        table = pq.read_table(path)
        assert table.column_names == ["id", "prompt", "image", "answer"]
        assert table.to_pylist() == rows
        assert len({r["id"] for r in rows}) == 12 and rows[0]["id"] == f"{kind}-9-000000"
        for row in rows:
            image = Image.open(io.BytesIO(row["image"]))
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (40, 40)
    captions = scenes.records(12, 9, "caption")
    assert {r["prompt"] for r in captions} == {"Describe the image."}
    assert all(r["answer"].endswith(" background.") for r in captions)
    with pytest.raises(ValueError, match="kind"):
        scenes.records(1, 0, "captions")


def test_text_records_have_no_image(tmp_path):
    rows = scenes.text_records(30, 2)
    assert all(set(r) == {"id", "prompt", "answer"} for r in rows)
    assert len({r["prompt"] for r in rows}) > 3
    table = pq.read_table(scenes.write_parquet(rows, tmp_path / "text.parquet"))
    assert table.column_names == ["id", "prompt", "answer"]


def test_vocabulary_corpus_covers_everything_the_generator_says():
    vocabulary = set().union(*map(words, scenes.vocabulary_corpus()))
    rng = random.Random(4)
    for scene in sample_scenes(200, seed=6):
        assert words(scenes.caption(scene)) <= vocabulary
        for prompt, answer in scenes.instructions(scene, rng):
            assert words(prompt) | words(answer) <= vocabulary, (prompt, answer)
