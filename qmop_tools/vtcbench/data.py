"""Procedural VQA data for the mini VTCBench: scenes drawn with PIL, questions in five dimensions, short answers.

Every scene is a function of (split, index, seed) only, so the same seed gives the same pictures on any machine.
A 144 x 144 picture on a 6-pixel patch grid gives LLaVA's 24 x 24 = 576 patches. A scene has

- a background colour (6) under a texture (5: plain, striped, dotted, checkered, grainy);
- 2 to 5 shapes (circle, square, triangle, diamond; 8 colours; big or small), no two alike in both colour and shape;
- two tags in two different corners, each a 10 x 14 pixel letter (8 letters) in a 14 x 18 pixel coloured box
  (6 colours).

and one question per dimension (answers are single words):

| dimension | asks about                               | answers                               | chance |
|-----------|------------------------------------------|---------------------------------------|--------|
| global    | the background colour                    | white black grey blue green brown     | 1/6    |
| local     | the letter, or the colour, of the tag in a named corner | e f h l t x o k / 6 colours | 1/8, 1/6 |
| spatial   | one shape left/right of (above/below) another | left right / above below         | 1/2    |
| counting  | how many shapes of a kind                | one two three four                    | 1/4    |
| style     | the texture of the background            | plain striped dotted checkered grainy | 1/5    |

Local questions are meant to need detail (a tag covers about 2 x 3 patches, less than half of one 4 x 4 pooling
cell at M = 36, and its letter is finer still); global and style ones need the whole picture. A caption lists everything, for the contrastive
pre-training of the tiny CLIP and for stage 1.
"""

import json
import os
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

DATA_VERSION = 2  # bump when scenes, questions or drawing change: cached data on disk is then regenerated
IMAGE_SIZE = 144
PATCH_SIZE = 6
DIMENSIONS = ("global", "local", "spatial", "counting", "style")

BACKGROUNDS = {
    "white": (236, 236, 230),
    "black": (22, 22, 26),
    "grey": (128, 128, 128),
    "blue": (40, 70, 170),
    "green": (40, 130, 60),
    "brown": (120, 80, 40),
}
OBJECT_COLOURS = {
    "red": (220, 30, 30),
    "yellow": (250, 220, 40),
    "blue": (40, 90, 240),
    "green": (50, 200, 70),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
TEXTURES = ("plain", "striped", "dotted", "checkered", "grainy")
SHAPES = ("circle", "square", "triangle", "diamond")
NUMBERS = ("one", "two", "three", "four")
CORNERS = ("top left", "top right", "bottom left", "bottom right")
TAG_COLOURS = ("red", "yellow", "blue", "green", "purple", "orange")
# 5 x 7 bitmaps, drawn at 2x: 10 x 14 pixels.
GLYPHS = {
    "e": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "f": ("11111", "10000", "10000", "11110", "10000", "10000", "10000"),
    "h": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "l": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "t": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "x": ("10001", "10001", "01010", "00100", "01010", "10001", "10001"),
    "o": ("01110", "10001", "10001", "10001", "10001", "10001", "01110"),
    "k": ("10001", "10010", "10100", "11000", "10100", "10010", "10001"),
}
GLYPH_SCALE = 2
TAG_MARGIN = 2  # box border around the glyph, in pixels
CORNER_ZONE = 30  # shapes stay out of the 30 x 30 corners, where the tags live

QUESTION_TEMPLATES = {
    "global": ("what colour is the background?", "what is the colour of the background?"),
    "local": ("what letter is in the {corner} corner?", "which letter is written in the {corner} corner?"),
    "local_colour": ("what colour is the tag in the {corner} corner?",),
    "spatial_h": ("is the {a} left or right of the {b}?",),
    "spatial_v": ("is the {a} above or below the {b}?",),
    "counting": ("how many {shape}s are there?", "count the {shape}s. how many are there?"),
    "style": ("what is the texture of the background?", "what pattern does the background have?"),
}
ANSWERS = {
    "global": tuple(BACKGROUNDS),
    "local": tuple(GLYPHS) + TAG_COLOURS,
    "spatial": ("left", "right", "above", "below"),
    "counting": NUMBERS,
    "style": TEXTURES,
}


@dataclass
class Shape:
    shape: str
    colour: str
    big: bool
    x: int
    y: int
    radius: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    background: str
    texture: str
    shapes: list
    tags: dict  # corner -> letter
    tag_colours: dict = field(default_factory=dict)  # corner -> colour of the tag's box
    texture_seed: int = 0
    questions: list = field(default_factory=list)  # [{"dimension", "question", "answer"}]

    def caption(self) -> str:
        parts = []
        for s in self.shapes:
            horizontal = "left" if s.x < 56 else "right" if s.x > 88 else "middle"
            vertical = "top" if s.y < 56 else "bottom" if s.y > 88 else "middle"
            where = " ".join(part for part in (vertical, horizontal) if part != "middle") or "centre"
            parts.append(f"a {'big' if s.big else 'small'} {s.name} at the {where}")
        shapes = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        tags = " and ".join(f"the letter {letter} on a {self.tag_colours[corner]} tag in the {corner} corner"
                            for corner, letter in self.tags.items())
        return f"a {self.texture} {self.background} background with {shapes}; {tags}"


# ===================================================================================== scenes
def _place_shapes(rng: random.Random, specs: list) -> list:
    placed = []
    for shape, colour, big in specs:
        radius = rng.randint(12, 16) if big else rng.randint(6, 8)
        for _ in range(200):
            x, y = rng.randint(radius + 2, IMAGE_SIZE - radius - 3), rng.randint(radius + 2, IMAGE_SIZE - radius - 3)
            in_corner = (x - radius < CORNER_ZONE or x + radius > IMAGE_SIZE - CORNER_ZONE) and (
                y - radius < CORNER_ZONE or y + radius > IMAGE_SIZE - CORNER_ZONE
            )
            if in_corner or any((x - p.x) ** 2 + (y - p.y) ** 2 < (radius + p.radius + 4) ** 2 for p in placed):
                continue
            placed.append(Shape(shape, colour, big, x, y, radius))
            break
        else:
            return []
    return placed


def make_scene(rng: random.Random) -> Scene:
    """A random scene and its five questions."""
    while True:
        background = rng.choice(tuple(BACKGROUNDS))
        colours = [c for c in OBJECT_COLOURS if c != background]
        counted = rng.choice(SHAPES)
        count = rng.randint(1, 4)
        total = rng.randint(max(2, count), min(5, count + 3))
        others = [s for s in SHAPES if s != counted]
        kinds = [counted] * count + [rng.choice(others) for _ in range(total - count)]
        combos = set()
        specs = []
        for kind in kinds:
            colour = rng.choice([c for c in colours if (c, kind) not in combos])
            combos.add((colour, kind))
            specs.append((kind, colour, rng.random() < 0.5))
        rng.shuffle(specs)
        shapes = _place_shapes(rng, specs)
        if not shapes:
            continue
        corners = rng.sample(CORNERS, 2)
        letters = rng.sample(tuple(GLYPHS), 2)
        tag_colours = rng.sample([c for c in TAG_COLOURS if c != background], 2)
        scene = Scene(background, rng.choice(TEXTURES), shapes, dict(zip(corners, letters)),
                      dict(zip(corners, tag_colours)), rng.randrange(2**31))
        spatial = _spatial_question(rng, shapes)
        if spatial is None:
            continue
        corner = rng.choice(corners)
        scene.questions = [
            {"dimension": "global", "question": rng.choice(QUESTION_TEMPLATES["global"]), "answer": background},
            _local_question(rng, scene, corner),
            spatial,
            {
                "dimension": "counting",
                "question": rng.choice(QUESTION_TEMPLATES["counting"]).format(shape=counted),
                "answer": NUMBERS[count - 1],
            },
            {"dimension": "style", "question": rng.choice(QUESTION_TEMPLATES["style"]), "answer": scene.texture},
        ]
        return scene


def _local_question(rng: random.Random, scene: Scene, corner: str) -> dict:
    """Half the local questions ask for the tag's letter, half for its colour."""
    if rng.random() < 0.5:
        question, answer = rng.choice(QUESTION_TEMPLATES["local"]), scene.tags[corner]
    else:
        question, answer = rng.choice(QUESTION_TEMPLATES["local_colour"]), scene.tag_colours[corner]
    return {"dimension": "local", "question": question.format(corner=corner), "answer": answer}


def _spatial_question(rng: random.Random, shapes: list):
    pairs = [(a, b) for a in shapes for b in shapes if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs:
        axes = [axis for axis, gap in (("h", b.x - a.x), ("v", b.y - a.y)) if abs(gap) >= 16]
        if not axes:
            continue
        axis = rng.choice(axes)
        if axis == "h":
            answer = "left" if a.x < b.x else "right"
        else:
            answer = "above" if a.y < b.y else "below"
        template = rng.choice(QUESTION_TEMPLATES["spatial_" + axis])
        return {"dimension": "spatial", "question": template.format(a=a.name, b=b.name), "answer": answer}
    return None


# ===================================================================================== drawing
def _shade(colour, delta):
    return tuple(max(0, min(255, c + delta)) for c in colour)


def draw_scene(scene: Scene) -> Image.Image:
    base = BACKGROUNDS[scene.background]
    delta = -70 if sum(base) > 384 else 70
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), base)
    draw = ImageDraw.Draw(image)
    rng = random.Random(scene.texture_seed)
    phase = rng.randrange(12)
    other = _shade(base, delta)
    if scene.texture == "striped":
        for x in range(-IMAGE_SIZE, IMAGE_SIZE, 12):  # diagonal stripes
            draw.polygon([(x + phase, 0), (x + phase + 6, 0), (x + phase + 6 + IMAGE_SIZE, IMAGE_SIZE),
                          (x + phase + IMAGE_SIZE, IMAGE_SIZE)], fill=other)
    elif scene.texture == "dotted":
        for y in range(phase % 9, IMAGE_SIZE, 9):
            for x in range(phase % 9, IMAGE_SIZE, 9):
                draw.ellipse([x, y, x + 3, y + 3], fill=other)
    elif scene.texture == "checkered":
        for y in range(0, IMAGE_SIZE, 12):
            for x in range(0, IMAGE_SIZE, 12):
                if (x // 12 + y // 12) % 2:
                    draw.rectangle([x, y, x + 11, y + 11], fill=other)
    elif scene.texture == "grainy":
        pixels = image.load()
        for y in range(IMAGE_SIZE):
            for x in range(IMAGE_SIZE):
                if rng.random() < 0.35:
                    pixels[x, y] = _shade(base, rng.choice((-1, 1)) * rng.randint(50, 90))
    for s in scene.shapes:
        fill = OBJECT_COLOURS[s.colour]
        outline = _shade(fill, -60 if sum(fill) > 300 else 60)
        r, x, y = s.radius, s.x, s.y
        if s.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
        elif s.shape == "square":
            q = int(r * 0.85)
            draw.rectangle([x - q, y - q, x + q, y + q], fill=fill, outline=outline)
        elif s.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill, outline=outline)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill, outline=outline)
    for corner, letter in scene.tags.items():
        _draw_tag(draw, rng, corner, letter, OBJECT_COLOURS[scene.tag_colours[corner]])
    return image


def _draw_tag(draw: ImageDraw.ImageDraw, rng: random.Random, corner: str, letter: str, box: tuple):
    width = 5 * GLYPH_SCALE + 2 * TAG_MARGIN
    height = 7 * GLYPH_SCALE + 2 * TAG_MARGIN
    x = rng.randint(3, CORNER_ZONE - width - 2)
    y = rng.randint(3, CORNER_ZONE - height - 2)
    if "right" in corner:
        x = IMAGE_SIZE - x - width
    if "bottom" in corner:
        y = IMAGE_SIZE - y - height
    luminance = 0.299 * box[0] + 0.587 * box[1] + 0.114 * box[2]
    ink = (0, 0, 0) if luminance > 110 else (255, 255, 255)
    draw.rectangle([x, y, x + width - 1, y + height - 1], fill=box)
    for row, bits in enumerate(GLYPHS[letter]):
        for col, bit in enumerate(bits):
            if bit == "1":
                px, py = x + TAG_MARGIN + col * GLYPH_SCALE, y + TAG_MARGIN + row * GLYPH_SCALE
                draw.rectangle([px, py, px + GLYPH_SCALE - 1, py + GLYPH_SCALE - 1], fill=ink)


def scene_from_dict(data: dict) -> Scene:
    data = dict(data)
    data["shapes"] = [Shape(**s) for s in data["shapes"]]
    return Scene(**data)


# ===================================================================================== splits on disk
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def generate_split(split: str, num_images: int, seed: int = 0) -> list:
    """Scenes of one split; split and seed fix them (the splits never share a random stream)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"Unknown split {split!r}; choose from {sorted(SPLIT_OFFSETS)}.")
    if num_images < 1:
        raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
    rng = random.Random(f"qmop-vtcbench/{seed}/{split}")
    return [make_scene(rng) for _ in range(num_images)]


def write_dataset(output_dir: str, sizes: dict, seed: int = 0) -> dict:
    """Write images/{split}/NNNNN.png and, per split, `{split}.json` (scenes, questions, captions) plus the LLaVA
    training files `{split}_captions.json` (stage 1) and `{split}_vqa.json` (stage 2). Written to a temporary folder
    and moved into place. Returns {split: number of images}."""
    from conversion.tiny import atomic_folder

    with atomic_folder(output_dir) as tmp:
        for split, size in sizes.items():
            scenes = generate_split(split, size, seed)
            os.makedirs(os.path.join(tmp, "images", split))
            records, captions, vqa = [], [], []
            for index, scene in enumerate(scenes):
                image = f"{split}/{index:05d}.png"
                draw_scene(scene).save(os.path.join(tmp, "images", image))
                caption = scene.caption()
                records.append({"image": image, "caption": caption, **asdict(scene)})
                captions.append({
                    "id": f"{split}-{index}-caption",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the picture."},
                        {"from": "gpt", "value": caption},
                    ],
                })
                for q in scene.questions:
                    vqa.append({
                        "id": f"{split}-{index}-{q['dimension']}",
                        "image": image,
                        "dimension": q["dimension"],
                        "conversations": [
                            {"from": "human", "value": "<image>\n" + q["question"]},
                            {"from": "gpt", "value": q["answer"]},
                        ],
                    })
            for name, content in ((split, records), (f"{split}_captions", captions), (f"{split}_vqa", vqa)):
                with open(os.path.join(tmp, f"{name}.json"), "w") as f:
                    json.dump(content, f)
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            json.dump(dataset_marker(seed, sizes), f)
    return dict(sizes)


def dataset_marker(seed: int, sizes: dict) -> dict:
    return {"version": DATA_VERSION, "seed": seed, "sizes": dict(sizes), "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE}


def corpus(scenes: list) -> list:
    """Every text the models will see: captions, questions and answers (for the tokenizers and the LLM's text
    pre-training)."""
    lines = []
    for scene in scenes:
        lines.append(scene.caption())
        for q in scene.questions:
            lines.append(q["question"])  # a question also starts a line (after "<image>\n")
            lines.append(f"USER: {q['question']} ASSISTANT: {q['answer']}")
    return lines
