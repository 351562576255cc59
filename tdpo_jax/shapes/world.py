"""The shapes world: procedural text-to-image scenes with exactly known attributes.

Shape legend: B batch, S image side (32). Images are uint8 (S, S, 3) RGB, coloured shapes on a
white background.

A scene is one or two shapes of ONE colour and ONE kind; a single shape may have a position.
Prompts are deterministic in form, so `parse_prompt(prompt(scene))` recovers the attributes:

  "a red circle"                 count 1, no position (placed anywhere)
  "a blue square on the left"    count 1, position left / right ("on the ...") or top / bottom
                                 ("at the ...")
  "two yellow triangles"         count 2 (placed anywhere, not touching)

Shapes are axis-aligned: a disc, a square, an upright isosceles triangle with base = height
(their fill ratios of the bounding box are pi/4, 1 and 1/2, which the gold detector uses). They
are drawn at `SUPERSAMPLE`x resolution and box-downsampled, so edges are anti-aliased.
"""
import dataclasses
import re

import numpy as np
from PIL import Image
from PIL import ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)
# Mid-saturation colours well apart in hue (0, ~50, ~130, ~225 degrees).
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = (1, 2)
POSITIONS = ("left", "right", "top", "bottom")
COUNT_WORDS = {1: "a", 2: "two"}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom"}
# Unit direction of each position from the image centre, (dx, dy) with y pointing down.
POSITION_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}

# Sampling distribution of scenes.
PROB_TWO = 0.5                  # P(count = 2)
PROB_POSITION = 0.5             # P(a single shape has a stated position)
SINGLE_SIZE = (10, 15)          # side / diameter range in pixels (inclusive) of a single shape
PAIR_SIZE = (9, 12)             # ... of each shape of a pair
PAIR_GAP = 3                    # min pixels between the bounding boxes of a pair
POSITION_OFFSET = (6, 10)       # |offset| of a positioned shape's centre along its direction
POSITION_JITTER = 2             # max |offset| across its direction
MARGIN = 1                      # min pixels between a shape and the image border
_MAX_PLACEMENT_TRIES = 100


@dataclasses.dataclass(frozen=True)
class Shape:
  """One drawn shape: kind, size (bbox side in px) and centre (x, y) in pixels (float)."""
  kind: str
  size: int
  centre: tuple


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: the prompt attributes plus the drawn shapes.

  Attributes:
    colour: a key of COLOURS.
    shape: one of SHAPES.
    count: 1 or 2 (== len(shapes)).
    position: one of POSITIONS or None (only for count 1).
    shapes: tuple of `Shape`.
  """
  colour: str
  shape: str
  count: int
  position: str | None
  shapes: tuple


# ---------------------------------------------------------------------------------------------
# Prompts.


def prompt_of(colour, shape, count, position=None):
  """The prompt text of a set of attributes, e.g. ("red", "circle", 2) -> "two red circles"."""
  if colour not in COLOURS or shape not in SHAPES or count not in COUNTS:
    raise ValueError(f"bad attributes colour={colour!r} shape={shape!r} count={count!r}; expected "
                     f"colour in {sorted(COLOURS)}, shape in {SHAPES}, count in {COUNTS}")
  if position is not None and (position not in POSITIONS or count != 1):
    raise ValueError(f"bad position={position!r} for count={count}; expected one of {POSITIONS} "
                     "and only for a single shape")
  noun = shape + ("s" if count > 1 else "")
  text = f"{COUNT_WORDS[count]} {colour} {noun}"
  return text if position is None else f"{text} {_POSITION_PHRASES[position]}"


def prompt(scene):
  """The prompt of a `Scene`."""
  return prompt_of(scene.colour, scene.shape, scene.count, scene.position)


_COUNT_BY_WORD = {word: count for count, word in COUNT_WORDS.items()}
_POSITION_BY_PHRASE = {phrase: position for position, phrase in _POSITION_PHRASES.items()}
_PROMPT_RE = re.compile(
    r"(?P<count>a|two) (?P<colour>\w+) (?P<shape>\w+?)(?P<plural>s?)"
    r"(?: (?P<position>on the left|on the right|at the top|at the bottom))?")


def parse_prompt(text):
  """Attributes of a world prompt: {"colour", "shape", "count", "position" (None if absent)}.

  Raises:
    ValueError: for text that is not a prompt of this world (names the text and the grammar).
  """
  match = _PROMPT_RE.fullmatch(text.strip().lower())
  grammar = "'a|two <colour> <shape>[s] [on the left|on the right|at the top|at the bottom]'"
  if match is None:
    raise ValueError(f"not a shapes-world prompt: {text!r}; expected {grammar}")
  count = _COUNT_BY_WORD[match["count"]]
  colour, shape = match["colour"], match["shape"]
  position = _POSITION_BY_PHRASE.get(match["position"]) if match["position"] else None
  plural_ok = (match["plural"] == "s") == (count > 1)
  if colour not in COLOURS or shape not in SHAPES or not plural_ok or (position and count > 1):
    raise ValueError(f"not a shapes-world prompt: {text!r}; expected {grammar} with colour in "
                     f"{sorted(COLOURS)}, shape in {SHAPES}, plural iff two, position only for one")
  return {"colour": colour, "shape": shape, "count": count, "position": position}


def all_prompts():
  """Every prompt of the world, in a fixed order (4 colours x 3 shapes x 6 forms = 72)."""
  result = []
  for colour in COLOURS:
    for shape in SHAPES:
      result.append(prompt_of(colour, shape, 1))
      result.extend(prompt_of(colour, shape, 1, position) for position in POSITIONS)
      result.append(prompt_of(colour, shape, 2))
  return result


def vocabulary():
  """The words of all prompts, sorted."""
  return sorted({word for text in all_prompts() for word in text.split()})


# ---------------------------------------------------------------------------------------------
# Sampling and rendering.


def _free_centre(rng, size):
  """A uniformly random centre keeping a `size` shape MARGIN px inside the image."""
  low = MARGIN + size / 2
  high = IMAGE_SIZE - MARGIN - size / 2
  return (float(rng.uniform(low, high)), float(rng.uniform(low, high)))


def _positioned_centre(rng, size, position):
  """A centre offset from the image centre in `position`'s direction (kept inside the image)."""
  dx, dy = POSITION_DIRECTIONS[position]
  along = rng.uniform(*POSITION_OFFSET)
  across = rng.uniform(-POSITION_JITTER, POSITION_JITTER)
  half = IMAGE_SIZE / 2
  x = half + dx * along + dy * across
  y = half + dy * along + dx * across
  low, high = MARGIN + size / 2, IMAGE_SIZE - MARGIN - size / 2
  return (float(np.clip(x, low, high)), float(np.clip(y, low, high)))


def _apart(first, second):
  """Whether two shapes' bounding boxes are at least PAIR_GAP px apart (in x or in y)."""
  gap_x = abs(first.centre[0] - second.centre[0]) - (first.size + second.size) / 2
  gap_y = abs(first.centre[1] - second.centre[1]) - (first.size + second.size) / 2
  return max(gap_x, gap_y) >= PAIR_GAP


def make_scene(rng, colour, shape, count, position=None):
  """A random layout of given attributes.

  Args:
    rng: a `np.random.Generator`.
    colour, shape, count, position: attributes (see `prompt_of`).
  Returns:
    a `Scene`.
  """
  prompt_of(colour, shape, count, position)  # validates
  if count == 1:
    size = int(rng.integers(SINGLE_SIZE[0], SINGLE_SIZE[1] + 1))
    centre = (_positioned_centre(rng, size, position) if position else _free_centre(rng, size))
    return Scene(colour, shape, 1, position, (Shape(shape, size, centre),))
  for _ in range(_MAX_PLACEMENT_TRIES):
    shapes = []
    for _ in range(count):
      size = int(rng.integers(PAIR_SIZE[0], PAIR_SIZE[1] + 1))
      shapes.append(Shape(shape, size, _free_centre(rng, size)))
    if all(_apart(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:]):
      return Scene(colour, shape, count, None, tuple(shapes))
  raise RuntimeError(f"could not place {count} shapes apart in {_MAX_PLACEMENT_TRIES} tries")


def sample_scene(rng):
  """A random scene: uniform colour and shape, P(two) = PROB_TWO, P(position | one)."""
  colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  count = 2 if rng.random() < PROB_TWO else 1
  position = None
  if count == 1 and rng.random() < PROB_POSITION:
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
  return make_scene(rng, colour, shape, count, position)


def _draw(draw, item, fill):
  """Draws one `Shape` on a SUPERSAMPLE-scaled canvas."""
  scale = SUPERSAMPLE
  cx, cy = item.centre[0] * scale, item.centre[1] * scale
  half = item.size * scale / 2
  box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
  if item.kind == "circle":
    draw.ellipse(box, fill=fill)
  elif item.kind == "square":
    draw.rectangle(box, fill=fill)
  else:  # triangle: apex at top centre, base at the bottom.
    draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)


def render(scene):
  """The image of a scene: uint8 (S, S, 3), shapes on white, anti-aliased."""
  side = IMAGE_SIZE * SUPERSAMPLE
  canvas = Image.new("RGB", (side, side), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for item in scene.shapes:
    _draw(draw, item, COLOURS[scene.colour])
  image = np.asarray(canvas, dtype=np.float32)
  image = image.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
  return np.round(image).astype(np.uint8)


def batch(seed, index, batch_size):
  """Batch `index` of the dataset of `seed`: (images uint8 (B, S, S, 3), prompts list of B).

  Deterministic in (seed, index), so a resumed run sees the same data stream.
  """
  rng = np.random.default_rng([seed, index])
  scenes = [sample_scene(rng) for _ in range(batch_size)]
  return np.stack([render(scene) for scene in scenes]), [prompt(scene) for scene in scenes]


def batches(seed, batch_size, start=0):
  """Infinite iterator of `batch(seed, i, batch_size)` for i = start, start + 1, ..."""
  index = start
  while True:
    yield batch(seed, index, batch_size)
    index += 1
