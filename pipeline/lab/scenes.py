"""The demo world's data: seeded synthetic scenes of coloured shapes, their images, and instructions about them.

A scene is a background tone and one to three shapes (kind, colour, size), at most one in each third of the
image (left, middle, right). `render` draws it with PIL; `caption` and `instructions` give answers in a small,
fixed phrasing whose colour, size, kind, position and count words can only be known from the image, so a
text-only model fails exactly on those words. `records`, `text_records` and `write_parquet` turn scenes into
Parquet datasets (id, prompt, image as inline PNG bytes, answer) for training a tiny VLM and its drafters, and
`vocabulary_corpus` lists every phrase the generator can emit, for training a tokenizer. Same seed, same data.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")  # thirds of the image, left to right
BACKGROUNDS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0), "beige": (225, 210, 175)}
MAX_SHAPES = 3
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

# A shape's side as a fraction of its third's width: large shapes cover about 4x the area of small ones.
EXTENT = {"small": 0.5, "large": 0.9}
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}

DESCRIBE = "Describe the image."
COUNT = "How many shapes are there?"
COLOUR_OF_KIND = "What colour is the {kind}?"
SHAPE_AT = "What shape is {place}?"
HAS_COLOUR = "Is there {article} {colour} shape?"

RECORD_KINDS = ("caption", "instruct")


@dataclass(frozen=True)
class Shape:
    kind: str  # one of KINDS
    colour: str  # a key of COLOURS
    size: str  # one of SIZES
    position: str  # one of POSITIONS


@dataclass(frozen=True)
class Scene:
    background: str  # a key of BACKGROUNDS
    shapes: tuple[Shape, ...]  # left to right, at most one per position


def random_scene(rng: random.Random) -> Scene:
    """One to three shapes of independent kind, colour and size, in distinct positions, on a random background."""
    count = rng.randint(1, MAX_SHAPES)
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    shapes = tuple(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(SIZES), p) for p in positions)
    return Scene(rng.choice(list(BACKGROUNDS)), shapes)


def render(scene: Scene, size: int = 32) -> Image.Image:
    """The scene as a size x size RGB image: each shape centred in its third, without anti-aliasing."""
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    third = size / len(POSITIONS)
    for shape in scene.shapes:
        centre_x = (POSITIONS.index(shape.position) + 0.5) * third
        side = max(1, round(EXTENT[shape.size] * third))
        left, top = round(centre_x - side / 2), round((size - side) / 2)
        right, bottom = left + side - 1, top + side - 1  # PIL boxes include their last pixel
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((left, top, right, bottom), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((left, top, right, bottom), fill=fill)
        else:
            draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG, as stored inline in the datasets' image column."""
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    return encoded.getvalue()


def _has_colour_prompt(colour: str) -> str:
    return HAS_COLOUR.format(article="an" if colour[0] in "aeiou" else "a", colour=colour)


def _shape_phrase(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind}"


def caption(scene: Scene) -> str:
    """The shapes left to right, e.g. 'a small red circle on the left and a large blue square on the right, on a grey
    background.'"""
    parts = [f"{_shape_phrase(s)} {POSITION_PHRASES[s.position]}" for s in scene.shapes]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed}, on a {scene.background} background."


def instructions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, answer) pairs: one question of each kind the scene allows, its subject drawn with rng, shuffled."""
    kinds = [s.kind for s in scene.shapes]
    colours = {s.colour for s in scene.shapes}
    pairs = [(DESCRIBE, caption(scene)), (COUNT, f"{NUMBER_WORDS[len(scene.shapes)]}.")]
    unique = [s for s in scene.shapes if kinds.count(s.kind) == 1]  # "the <kind>" must name a single shape
    if unique:
        shape = rng.choice(unique)
        pairs.append((COLOUR_OF_KIND.format(kind=shape.kind), f"{shape.colour}."))
    shape = rng.choice(scene.shapes)
    pairs.append((SHAPE_AT.format(place=POSITION_PHRASES[shape.position]), f"{_shape_phrase(shape)}."))
    present = rng.random() < 0.5  # balance yes and no answers
    colour = rng.choice(sorted(colours) if present else [c for c in COLOURS if c not in colours])
    pairs.append((_has_colour_prompt(colour), "yes." if present else "no."))
    rng.shuffle(pairs)
    return pairs


def records(num_scenes: int, seed: int, kind: str, image_size: int = 32) -> list[dict]:
    """Rows {id, prompt, image (PNG bytes), answer}, one per scene: its caption ("caption") or a random
    instruction about it ("instruct"). Each (kind, seed) is its own random stream."""
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind must be one of {RECORD_KINDS}, got {kind!r}")
    rng = random.Random(f"{kind}-{seed}")
    rows = []
    for i in range(num_scenes):
        scene = random_scene(rng)
        prompt, answer = (DESCRIBE, caption(scene)) if kind == "caption" else rng.choice(instructions(scene, rng))
        rows.append({"id": f"{kind}-{seed}-{i:06d}", "prompt": prompt, "image": png_bytes(render(scene, image_size)),
                     "answer": answer})
    return rows


def text_records(num: int, seed: int) -> list[dict]:
    """Rows {id, prompt, answer} without images: random instructions about random scenes, for a drafter's language
    model to learn the phrasing before it sees images."""
    rng = random.Random(f"text-{seed}")
    rows = []
    for i in range(num):
        prompt, answer = rng.choice(instructions(random_scene(rng), rng))
        rows.append({"id": f"text-{seed}-{i:06d}", "prompt": prompt, "answer": answer})
    return rows


def write_parquet(rows: list[dict], path: str | Path) -> Path:
    """The rows as one Parquet file at path (parent directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def vocabulary_corpus() -> list[str]:
    """Every prompt, short answer, shape phrase and background phrase the generator can emit, plus one full caption
    per background (for the joining punctuation): text a tokenizer must cover."""
    shapes = [Shape(k, c, s, p) for k in KINDS for c in COLOURS for s in SIZES for p in POSITIONS]
    prompts = [DESCRIBE, COUNT, *(COLOUR_OF_KIND.format(kind=k) for k in KINDS),
               *(SHAPE_AT.format(place=p) for p in POSITION_PHRASES.values()),
               *(_has_colour_prompt(c) for c in COLOURS)]
    answers = [f"{w}." for w in NUMBER_WORDS.values()] + [f"{c}." for c in COLOURS] + ["yes.", "no."]
    answers += sorted({f"{_shape_phrase(s)}." for s in shapes})
    phrases = [f"{_shape_phrase(s)} {POSITION_PHRASES[s.position]}" for s in shapes]
    full_row = tuple(Shape(KINDS[i], list(COLOURS)[i], SIZES[i % 2], POSITIONS[i]) for i in range(MAX_SHAPES))
    captions = [caption(Scene(background, full_row)) for background in BACKGROUNDS]
    return prompts + answers + phrases + captions
