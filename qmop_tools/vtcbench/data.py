"""Procedural VQA data for the mini VTCBench: scenes drawn with PIL, questions in five dimensions, short answers.

Every scene is a function of (split, index, seed) only, so the same seed gives the same pictures on any machine.
A 144 x 144 picture on a 6-pixel patch grid gives LLaVA's 24 x 24 = 576 patches. A scene has

- a background colour (6) under a texture (5: plain, striped, dotted, checkered, grainy);
- 1 to 4 small shapes (circle, square, triangle, diamond; 8 colours; all of one area), away from the corners;
- one cross (a thin black-and-white "+") clearly inside one half of the picture on both axes;
- one tag in one corner: a 15 x 21 pixel letter (8 letters) in a 21 x 27 pixel coloured box (6 colours).

and one question per dimension (answers are single words):

| dimension | asks about                                   | answers                               | chance |
|-----------|----------------------------------------------|---------------------------------------|--------|
| global    | the background colour                        | white black grey blue green brown     | 1/6    |
| local     | the letter on the tag                        | e f h l t x o k                       | 1/8    |
| spatial   | which half the tag is in (left/right or top/bottom) | left right / top bottom        | 1/2    |
| counting  | how many shapes there are                    | one two three four                    | 1/4    |
| style     | the texture of the background                | plain striped dotted checkered grainy | 1/5    |

Version 3 (the benchmark's v2) is built so that each question reads one thing in the picture, without a look-up by
position that a 2-layer LLM cannot learn in minutes (../shared/research/fidelity_diagnosis.md, section 4): there is one
tag and one cross, and counting counts every shape, all of one size so that area is proportional to count. The
contrast between branches is kept where the method says it is: a letter is a pattern of 3-pixel strokes across
about 3 x 4 patches at a random offset, so the 24 x 24 pixel pooling cells at M = 36 average it away, while a pruning branch that keeps the
tag's patches keeps it; the texture lives on the background, which salience pruning drops.

Version 5 asks spatial questions about the tag's half instead of the cross's (the pictures are unchanged; the cross is
still drawn and captioned). The reader probe (docs/vtcbench.md, "Foundation gates") measured why: every patch token
carries its own position, so "where is the thin cross" is read only once the LLM's attention singles the cross out,
and the tiny LLM found it only after about 35,000 spatial questions on their own at learning rate 5e-4 (never at
2e-3), and not within 8,000 mixed steps (about 51,000 spatial questions among the others); the tag, a coloured box
the LLM already attends to for the local question, is located in 250 steps. Pooling keeps where the tag is and loses
what it says: spatial is now the coarse "where" and local the fine "what" of the same object.

Version 6 is built to make counting countable (docs/vtcbench.md, "The counting gate"). Through version 5 every
variant, 576 tokens included, answered "how many shapes" at chance, and so did a tower head asked for the count on
every patch (27%, chance 25%): a three-layer tower does not learn to total the picture. What it learns at once is
local: whether a patch holds a shape's centre (98% of patches right, held out), one patch per shape, so a count
becomes the number of such patches. The label map now has that `centre` map; shapes are drawn larger (radius 8, from
7) and of one area (a triangle, square and diamond cover what the circle does; before, a triangle covered 57% of it),
so the shape area a pooled token carries grows with the count alone. In the reader probe an LLM reading all 576
tokens then learns the count (88% after 400 steps of counting alone), but not within the benchmark's mixed schedule
(37% after its 750 steps) unless stage 2 shows counting questions more often (`experiment.Settings.stage2_weights`:
67.5% with counting x3 in the probe, 66.3 ± 7.5 for the 576-token model in the benchmark).

Layout "pair" (`Settings.data_layout`, the benchmark's default since 2026-12-06; "tag" is version 6 as it was) was
built so that pooling would lose the letter (docs/vtcbench.md, "Data layout pair"). On version 6 pooling's letter grew with training (64 / 69 / 73 at 750 / 1,050 /
1,200 stage-2 steps) while pruning's stayed at 76-78: a 4 x 4 pooled cell that holds most of the one tag and
otherwise background keeps enough of its letter. In the pair layout two letters stand side by side in one 24 x 24
pooling cell at M = 36: the tag (a coloured box) and a decoy (a grey box), each a 10 x 14 pixel letter in a 12 x 16
box, the pair 24 pixels wide at the picture's edge. Each patch lies in one box (the boxes meet on a patch border), so
every patch token says which letter it shows and whether it is on the tag; the cell's average says which two
letters are there and that one of them is on a tag, not which one. The tower's per-patch heads name every glyph's
letter and tell the tag from the decoy; its picture-level letter head is dropped in this layout, so no token is
trained to carry the tag's letter away from the tag. Measured: the tower binds letter to box within each patch, so the
pooled cell still holds the tag's letter (a linear probe reads it at 77%); what changes is that the letter becomes a
look-up, which the mixed stage 2 teaches only the pruning-only models (local 63.5 against 12-15 for every other
variant, the 576-token model included) unless local questions are shown three times as often (`Settings.stage2_weights`
"counting=3,local=3", adopted with the layout): then 576 tokens read the letter at 97.5-100 and pruning at 97-99,
pooling at 16-51.

`draw_labels` draws, next to each picture, a per-patch map of what is there (kind, colour, letter, ...): the
foundation tower is pre-trained on it (dense supervision, `towers.py`), as CLIP is pre-trained on captions that
name those facts. Questions and answers are never shown to the tower.
"""

import json
import math
import os
import random
from dataclasses import asdict, dataclass, field, fields

from PIL import Image, ImageDraw

DATA_VERSION = 6  # bump when scenes, questions or drawing change: cached data on disk is then regenerated
LAYOUTS = ("tag", "pair")  # "tag": version 6 as it is; "pair": the tag and a decoy in one pooling cell (above)
IMAGE_SIZE = 144
PATCH_SIZE = 6
GRID = IMAGE_SIZE // PATCH_SIZE  # 24 patches a side
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
GLYPH_SCALE = 3  # 15 x 21 pixel letters: 3-pixel strokes, about 3 x 4 patches (the diagnosis's D2)
TAG_MARGIN = 3  # box border around the glyph, in pixels
CORNER_ZONE = 36  # shapes and the cross stay out of the 36 x 36 corners, where the tag lives
SHAPE_RADIUS = 8  # every shape the same area (`EQUAL_AREA`): a count is an area
# Each shape's drawn half-size over SHAPE_RADIUS, so that every shape covers the circle's area (pi r^2): a square
# of side 2 x 0.886 r, a triangle of base 2 x 1.321 r and height 1.8 x 1.321 r, a diamond of diagonal 2 x 1.253 r.
EQUAL_AREA = {"circle": 1.0, "square": math.pi**0.5 / 2, "triangle": (math.pi / 1.8) ** 0.5,
              "diamond": (math.pi / 2) ** 0.5}
CROSS_ARM = 6  # the cross spans 13 x 13 pixels
HALF_MARGIN = 14  # the cross's centre is at least this far from the middle lines
# Layout "pair": 5 x 7 letters drawn at 2x (10 x 14 pixels, 2-pixel strokes, 2 x 3 patches) in 12 x 16 boxes; tag and
# decoy side by side fill the 24 pixels of a pooling cell at M = 36 and meet on a patch border (x = 12).
PAIR_GLYPH_SCALE = 2
PAIR_MARGIN = 1
PAIR_BOX = (5 * PAIR_GLYPH_SCALE + 2 * PAIR_MARGIN, 7 * PAIR_GLYPH_SCALE + 2 * PAIR_MARGIN)  # (12, 16)
DECOY_COLOUR = (200, 200, 200)  # grey: not a tag colour

QUESTION_TEMPLATES = {
    "global": ("what colour is the background?", "what is the colour of the background?"),
    "local": ("what letter is on the tag?", "which letter is written on the tag?"),
    "spatial_h": ("is the tag on the left or on the right?", "which side is the tag on, left or right?"),
    "spatial_v": ("is the tag at the top or at the bottom?", "is the tag in the top or the bottom half?"),
    "counting": ("how many shapes are there?", "count the shapes. how many are there?"),
    "style": ("what is the texture of the background?", "what pattern does the background have?"),
}
ANSWERS = {
    "global": tuple(BACKGROUNDS),
    "local": tuple(GLYPHS),
    "spatial": ("left", "right", "top", "bottom"),
    "counting": NUMBERS,
    "style": TEXTURES,
}


def parse_dimension_weights(text: str) -> dict:
    """"counting=3,local=2" -> {"counting": 3, "local": 2}: how often each dimension's questions are drawn (others
    once; `experiment.Settings.stage2_weights`, the reader probe's `weights`). Each name a dimension, each weight a
    whole number >= 1."""
    weights = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"a weight is `dimension=N` with a whole N >= 1, got {part!r}.")
        weights[name.strip()] = int(value)
    unknown = sorted(set(weights) - set(DIMENSIONS))
    if unknown:
        raise ValueError(f"the weights name unknown dimensions {unknown}; choose from {DIMENSIONS}.")
    return weights


# What a uniform guess among the answers a question allows gets right.
CHANCE = {"global": 1 / 6, "local": 1 / 8, "spatial": 1 / 2, "counting": 1 / 4, "style": 1 / 5}

# Per-patch label map (`draw_labels`): what the foundation tower is supervised with. -1 = not applicable.
KINDS = ("background", "shape", "cross", "tag", "decoy")  # "decoy" only in layout "pair"


def kinds(layout: str = "tag") -> tuple:
    """The kinds a layout's label maps use (the tower's kind head has one class each)."""
    return KINDS if layout == "pair" else KINDS[:4]


def data_version(layout: str = "tag"):
    """What cached data, foundations and runs are keyed by: DATA_VERSION, with the layout when it is not "tag"."""
    return DATA_VERSION if layout == "tag" else f"{DATA_VERSION}-{layout}"


@dataclass
class Shape:
    shape: str
    colour: str
    x: int
    y: int
    radius: int = SHAPE_RADIUS

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    background: str
    texture: str
    shapes: list
    cross: tuple  # (x, y) centre
    tag_corner: str
    tag_letter: str
    tag_colour: str
    tag_offset: tuple = (0, 0)  # (x, y) of the box inside its corner zone
    texture_seed: int = 0
    questions: list = field(default_factory=list)  # [{"dimension", "question", "answer"}]
    decoy_letter: str = ""  # layout "pair": the letter on the grey box next to the tag ("" in layout "tag")
    decoy_side: str = ""  # layout "pair": which of the pair's two places the decoy takes, "left" or "right"

    @property
    def tag_sides(self) -> tuple:
        """(left|right, top|bottom): the half of the picture the tag's corner is in, what spatial questions ask."""
        vertical, horizontal = self.tag_corner.split()
        return horizontal, vertical

    @property
    def cross_sides(self) -> tuple:
        x, y = self.cross
        return ("left" if x < IMAGE_SIZE / 2 else "right", "top" if y < IMAGE_SIZE / 2 else "bottom")

    def caption(self) -> str:
        parts = [f"a {s.name}" for s in self.shapes]
        shapes = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
        horizontal, vertical = self.cross_sides
        decoy = f" next to the letter {self.decoy_letter} on a grey box" if self.decoy_letter else ""
        return (f"a {self.texture} {self.background} background with {NUMBERS[len(self.shapes) - 1]} shapes: {shapes}; "
                f"a cross at the {vertical} {horizontal}; the letter {self.tag_letter} on a {self.tag_colour} tag"
                f"{decoy} in the {self.tag_corner} corner")


# ===================================================================================== scenes
def _outside_corners(x: int, y: int, reach: int) -> bool:
    in_corner = (x - reach < CORNER_ZONE or x + reach > IMAGE_SIZE - CORNER_ZONE) and (
        y - reach < CORNER_ZONE or y + reach > IMAGE_SIZE - CORNER_ZONE
    )
    return not in_corner


def make_scene(rng: random.Random, layout: str = "tag") -> Scene:
    """A random scene and its five questions (`layout`: one of LAYOUTS; "tag" draws the same scenes as before it
    existed)."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown data layout {layout!r}; choose from {LAYOUTS}.")
    while True:
        background = rng.choice(tuple(BACKGROUNDS))
        colours = [c for c in OBJECT_COLOURS if c != background]
        count = rng.randint(1, 4)
        r = math.ceil(SHAPE_RADIUS * max(EQUAL_AREA.values()))  # the reach of the largest drawn shape
        placed = []  # (x, y, reach) of everything drawn so far
        cx = rng.choice((rng.randint(12, IMAGE_SIZE // 2 - HALF_MARGIN), rng.randint(IMAGE_SIZE // 2 + HALF_MARGIN, 131)))
        cy = rng.choice((rng.randint(12, IMAGE_SIZE // 2 - HALF_MARGIN), rng.randint(IMAGE_SIZE // 2 + HALF_MARGIN, 131)))
        if not _outside_corners(cx, cy, CROSS_ARM):
            continue
        placed.append((cx, cy, CROSS_ARM))
        shapes = []
        for _ in range(count):
            for _ in range(200):
                x, y = rng.randint(r + 2, IMAGE_SIZE - r - 3), rng.randint(r + 2, IMAGE_SIZE - r - 3)
                if _outside_corners(x, y, r) and all((x - px) ** 2 + (y - py) ** 2 >= (r + reach + 6) ** 2
                                                      for px, py, reach in placed):
                    shapes.append(Shape(rng.choice(SHAPES), rng.choice(colours), x, y))
                    placed.append((x, y, r))
                    break
        if len(shapes) != count:
            continue
        width, height = 5 * GLYPH_SCALE + 2 * TAG_MARGIN, 7 * GLYPH_SCALE + 2 * TAG_MARGIN
        offset = (rng.randint(3, CORNER_ZONE - width - 2), rng.randint(3, CORNER_ZONE - height - 2))
        scene = Scene(background, rng.choice(TEXTURES), shapes, (cx, cy), rng.choice(CORNERS),
                      rng.choice(tuple(GLYPHS)), rng.choice([c for c in TAG_COLOURS if c != background]), offset,
                      rng.randrange(2**31))
        if layout == "pair":  # the pair at the picture's edge, inside the corner's pooling cell (rows 0-23 from the edge)
            scene.tag_offset = (0, rng.randint(0, 24 - PAIR_BOX[1]))
            scene.decoy_letter = rng.choice([g for g in GLYPHS if g != scene.tag_letter])
            scene.decoy_side = rng.choice(("left", "right"))
        horizontal, vertical = scene.tag_sides
        axis = rng.choice(("h", "v"))
        scene.questions = [
            {"dimension": "global", "question": rng.choice(QUESTION_TEMPLATES["global"]), "answer": background},
            {"dimension": "local", "question": rng.choice(QUESTION_TEMPLATES["local"]), "answer": scene.tag_letter},
            {"dimension": "spatial", "question": rng.choice(QUESTION_TEMPLATES["spatial_" + axis]),
             "answer": horizontal if axis == "h" else vertical},
            {"dimension": "counting", "question": rng.choice(QUESTION_TEMPLATES["counting"]),
             "answer": NUMBERS[count - 1]},
            {"dimension": "style", "question": rng.choice(QUESTION_TEMPLATES["style"]), "answer": scene.texture},
        ]
        return scene


# ===================================================================================== drawing
def _shade(colour, delta):
    return tuple(max(0, min(255, c + delta)) for c in colour)


def _corner_box(scene: Scene, width: int, height: int) -> tuple:
    """(x, y, width, height) of a box of that size at `scene.tag_offset` inside the tag's corner."""
    x, y = scene.tag_offset
    if "right" in scene.tag_corner:
        x = IMAGE_SIZE - x - width
    if "bottom" in scene.tag_corner:
        y = IMAGE_SIZE - y - height
    return x, y, width, height


def _pair_place(scene: Scene, right: bool) -> tuple:
    """(x, y, width, height) of the left or right box of the pair (layout "pair")."""
    x, y, _, height = _corner_box(scene, 2 * PAIR_BOX[0], PAIR_BOX[1])
    return x + (PAIR_BOX[0] if right else 0), y, PAIR_BOX[0], height


def _tag_box(scene: Scene) -> tuple:
    """(x, y, width, height) of the tag's box in pixels."""
    if not scene.decoy_letter:
        return _corner_box(scene, 5 * GLYPH_SCALE + 2 * TAG_MARGIN, 7 * GLYPH_SCALE + 2 * TAG_MARGIN)
    return _pair_place(scene, right=scene.decoy_side == "left")


def _decoy_box(scene: Scene) -> tuple:
    """(x, y, width, height) of the decoy's grey box (layout "pair")."""
    return _pair_place(scene, right=scene.decoy_side == "right")


def _draw_lettered_box(draw: ImageDraw.ImageDraw, box: tuple, letter: str, fill, ink, scale: int, margin: int) -> None:
    """A filled box and its letter drawn in `scale`-pixel strokes, `margin` pixels inside it."""
    x, y, width, height = box
    draw.rectangle([x, y, x + width - 1, y + height - 1], fill=fill)
    x, y = x + margin, y + margin
    for row, bits in enumerate(GLYPHS[letter]):
        for col, bit in enumerate(bits):
            if bit == "1":
                draw.rectangle([x + col * scale, y + row * scale, x + (col + 1) * scale - 1, y + (row + 1) * scale - 1],
                               fill=ink)


def _draw_objects(draw: ImageDraw.ImageDraw, scene: Scene, fills: dict) -> None:
    """Shapes, cross and tag with `fills[kind]` (a colour, or a callable of the object giving one): the same geometry
    for the picture and for its label map."""
    for s in scene.shapes:
        fill = fills["shape"](s)
        outline = fills["shape_outline"](s)
        r, x, y = s.radius * EQUAL_AREA[s.shape], s.x, s.y
        if s.shape == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
        elif s.shape == "square":
            draw.rectangle([x - r, y - r, x + r, y + r], fill=fill, outline=outline)
        elif s.shape == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill, outline=outline)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill, outline=outline)
    cx, cy = scene.cross
    draw.rectangle([cx - CROSS_ARM, cy - 2, cx + CROSS_ARM, cy + 1], fill=fills["cross_outer"])
    draw.rectangle([cx - 2, cy - CROSS_ARM, cx + 1, cy + CROSS_ARM], fill=fills["cross_outer"])
    draw.rectangle([cx - CROSS_ARM + 1, cy - 1, cx + CROSS_ARM - 1, cy], fill=fills["cross_inner"])
    draw.rectangle([cx - 1, cy - CROSS_ARM + 1, cx, cy + CROSS_ARM - 1], fill=fills["cross_inner"])
    scale, margin = (PAIR_GLYPH_SCALE, PAIR_MARGIN) if scene.decoy_letter else (GLYPH_SCALE, TAG_MARGIN)
    _draw_lettered_box(draw, _tag_box(scene), scene.tag_letter, fills["tag"], fills["ink"], scale, margin)
    if scene.decoy_letter:
        _draw_lettered_box(draw, _decoy_box(scene), scene.decoy_letter, fills["decoy"], fills["decoy_ink"], scale, margin)


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
    box = OBJECT_COLOURS[scene.tag_colour]
    luminance = 0.299 * box[0] + 0.587 * box[1] + 0.114 * box[2]
    _draw_objects(draw, scene, {
        "shape": lambda s: OBJECT_COLOURS[s.colour],
        "shape_outline": lambda s: _shade(OBJECT_COLOURS[s.colour], -60 if sum(OBJECT_COLOURS[s.colour]) > 300 else 60),
        "cross_outer": (0, 0, 0),
        "cross_inner": (255, 255, 255),
        "tag": box,
        "ink": (0, 0, 0) if luminance > 110 else (255, 255, 255),
        "decoy": DECOY_COLOUR,
        "decoy_ink": (0, 0, 0),
    })
    return image


def draw_labels(scene: Scene) -> dict:
    """Per-patch labels (GRID x GRID lists of ints, -1 where a label does not apply) for dense pre-training:

    kind (KINDS: the object covering most of the patch, a tag, decoy or cross winning from a quarter of it),
    shape_colour (index in OBJECT_COLOURS, shape patches), letter (index in GLYPHS, tag and decoy patches, each its
    own letter), background and texture
    (background patches), row and column (every patch), centre (1 on the patch holding a shape's centre, 0 on every
    other patch)."""
    kind_map = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    colour_map = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 255)
    shape_colour = {s.colour: OBJECT_COLOURS_INDEX[s.colour] for s in scene.shapes}
    _draw_objects(ImageDraw.Draw(kind_map), scene, {
        "shape": lambda s: 1, "shape_outline": lambda s: 1, "cross_outer": 2, "cross_inner": 2, "tag": 3, "ink": 3,
        "decoy": 4, "decoy_ink": 4,
    })
    _draw_objects(ImageDraw.Draw(colour_map), scene, {
        "shape": lambda s: shape_colour[s.colour], "shape_outline": lambda s: shape_colour[s.colour],
        "cross_outer": 255, "cross_inner": 255, "tag": 255, "ink": 255, "decoy": 255, "decoy_ink": 255,
    })
    kinds, colours = kind_map.load(), colour_map.load()
    area = PATCH_SIZE * PATCH_SIZE
    labels = {name: [[-1] * GRID for _ in range(GRID)] for name in
              ("kind", "shape_colour", "letter", "background", "texture", "row", "column")}
    labels["centre"] = [[0] * GRID for _ in range(GRID)]
    for s in scene.shapes:
        labels["centre"][s.y // PATCH_SIZE][s.x // PATCH_SIZE] = 1
    for row in range(GRID):
        for col in range(GRID):
            counts = [0] * len(KINDS)
            colour_votes = {}
            for y in range(row * PATCH_SIZE, (row + 1) * PATCH_SIZE):
                for x in range(col * PATCH_SIZE, (col + 1) * PATCH_SIZE):
                    counts[kinds[x, y]] += 1
                    if colours[x, y] != 255:
                        colour_votes[colours[x, y]] = colour_votes.get(colours[x, y], 0) + 1
            if counts[3] * 4 >= area:
                kind = 3
            elif counts[4] * 4 >= area:
                kind = 4
            elif counts[2] * 4 >= area:
                kind = 2
            elif counts[1] * 3 >= area:
                kind = 1
            else:
                kind = 0
            labels["kind"][row][col] = kind
            labels["row"][row][col], labels["column"][row][col] = row, col
            if kind == 1:
                labels["shape_colour"][row][col] = max(colour_votes, key=colour_votes.get)
            elif kind == 3:
                labels["letter"][row][col] = LETTER_INDEX[scene.tag_letter]
            elif kind == 4:
                labels["letter"][row][col] = LETTER_INDEX[scene.decoy_letter]
            elif kind == 0:
                labels["background"][row][col] = BACKGROUND_INDEX[scene.background]
                labels["texture"][row][col] = TEXTURES.index(scene.texture)
    return labels


GLYPH_TARGETS = ("letter", "ink")  # what the tower's per-patch glyph head names (`towers.dense_heads`)
INK_CODES = 16  # `ink_labels`: 4 quadrants of a patch, each mostly ink or not


def ink_labels(scene: Scene, kind: list) -> list:
    """Per-patch ink pattern of the glyph patches (GRID x GRID, -1 elsewhere): bit q is set when quadrant q (3 x 3
    pixels: top left, top right, bottom left, bottom right) is mostly ink (5 of its 9 pixels). `kind` is the scene's
    `draw_labels(...)["kind"]`; tag and decoy patches get a code. The target of the glyph head when the tower should
    see strokes and not name letters (`glyph_target="ink"`; docs/vtcbench.md, "Data layout pair")."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_objects(ImageDraw.Draw(mask), scene, {
        "shape": lambda s: 0, "shape_outline": lambda s: 0, "cross_outer": 0, "cross_inner": 0, "tag": 0, "ink": 1,
        "decoy": 0, "decoy_ink": 1,
    })
    pixels, half = mask.load(), PATCH_SIZE // 2
    codes = [[-1] * GRID for _ in range(GRID)]
    for row in range(GRID):
        for col in range(GRID):
            if KINDS[kind[row][col]] not in ("tag", "decoy"):
                continue
            code = 0
            for bit, (dy, dx) in enumerate(((0, 0), (0, half), (half, 0), (half, half))):
                ink = sum(pixels[col * PATCH_SIZE + dx + i, row * PATCH_SIZE + dy + j]
                          for i in range(half) for j in range(half))
                code |= (ink >= 5) << bit
            codes[row][col] = code
    return codes


SCENE_FIELDS = tuple(f.name for f in fields(Scene))
OBJECT_COLOURS_INDEX = {name: i for i, name in enumerate(OBJECT_COLOURS)}
LETTER_INDEX = {name: i for i, name in enumerate(GLYPHS)}
BACKGROUND_INDEX = {name: i for i, name in enumerate(BACKGROUNDS)}


def scene_from_dict(data: dict) -> Scene:
    """The Scene of `asdict(scene)` or of a record of `{split}.json` (whose image, caption and labels it ignores)."""
    data = {name: data[name] for name in SCENE_FIELDS if name in data}
    data["shapes"] = [Shape(**s) for s in data["shapes"]]
    data["cross"] = tuple(data["cross"])
    data["tag_offset"] = tuple(data["tag_offset"])
    return Scene(**data)


# ===================================================================================== splits on disk
SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


def generate_split(split: str, num_images: int, seed: int = 0, layout: str = "tag") -> list:
    """Scenes of one split; split and seed fix them (the splits never share a random stream)."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"Unknown split {split!r}; choose from {sorted(SPLIT_OFFSETS)}.")
    if num_images < 1:
        raise ValueError(f"`num_images` must be >= 1, got {num_images}.")
    rng = random.Random(f"qmop-vtcbench/{seed}/{split}")
    return [make_scene(rng, layout) for _ in range(num_images)]


def write_dataset(output_dir: str, sizes: dict, seed: int = 0, layout: str = "tag") -> dict:
    """Write images/{split}/NNNNN.png and, per split, `{split}.json` (scenes, questions, captions) plus the LLaVA
    training files `{split}_captions.json` (stage 1) and `{split}_vqa.json` (stage 2). Written to a temporary folder
    and moved into place. Returns {split: number of images}."""
    from qmop_tools.files import atomic_folder

    with atomic_folder(output_dir) as tmp:
        for split, size in sizes.items():
            scenes = generate_split(split, size, seed, layout)
            os.makedirs(os.path.join(tmp, "images", split))
            records, captions, vqa = [], [], []
            for index, scene in enumerate(scenes):
                image = f"{split}/{index:05d}.png"
                draw_scene(scene).save(os.path.join(tmp, "images", image))
                caption = scene.caption()
                records.append({"image": image, "caption": caption, **asdict(scene), "labels": draw_labels(scene)})
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
            json.dump(dataset_marker(seed, sizes, layout), f)
    return dict(sizes)


def write_downsampled(data_dir: str, folder: str, side: int) -> None:
    """Copies of every picture in `images/` reduced to side x side pixels (area averaging) and scaled back to
    IMAGE_SIZE (nearest): the information of a side-pixel picture on the tower's usual grid. With side = 6 * sqrt(M),
    the tower's patches pooled to M tokens carry what M patches of the small picture would (the downsampling baseline
    of VTC-Bench). Written to a temporary folder and moved into place."""
    from qmop_tools.files import atomic_folder

    source = os.path.join(data_dir, "images")
    with atomic_folder(os.path.join(data_dir, folder)) as tmp:
        for split in sorted(os.listdir(source)):
            os.makedirs(os.path.join(tmp, split))
            for name in sorted(os.listdir(os.path.join(source, split))):
                with Image.open(os.path.join(source, split, name)) as image:
                    small = image.convert("RGB").resize((side, side), Image.BOX)
                small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST).save(os.path.join(tmp, split, name))


def dataset_marker(seed: int, sizes: dict, layout: str = "tag") -> dict:
    return {"version": data_version(layout), "seed": seed, "sizes": dict(sizes), "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE}


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
