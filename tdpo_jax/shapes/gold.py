"""The gold reward of the shapes world: an analytical detector, prompt fidelity and image quality.

Shape legend: B batch, S image side (32). Images are (S, S, 3), uint8 or float in [0, 1].

Detector (`detect`), on one image:
  ink        = 1 - min_c x_c                 (0 on white; ~0.85 on the world's colours)
  objects    = 8-connected components of ink > INK_THRESHOLD with >= MIN_AREA pixels
  colour     = the world colour nearest in hue to the component's mean core colour (pixels with
               ink > CORE_THRESHOLD), or None if that colour's HSV saturation < MIN_SATURATION
  shape      = triangle if the centroid sits below the bbox centre by >= TRIANGLE_MIN_SKEW of the
               bbox height (an upright triangle's sits 1/6 below, a disc's or square's at 0),
               else by fill ratio f = area / bbox area (disc pi/4, square 1): circle if
               f < CIRCLE_MAX_FILL, else square
  position   = of the centroid's offset (dx, dy) from the image centre: "centre" if
               max(|dx|, |dy|) < POSITION_MIN_OFFSET, else left/right/top/bottom by the
               dominant axis.

Gold reward of an image and its prompt (attributes a = `world.parse_prompt`), in [0, 1]:
  fidelity = mean over the prompt's attributes of
               count:    [#objects == a.count]
               colour:   fraction of objects of colour a.colour   (0 without objects)
               shape:    fraction of objects of shape a.shape     (0 without objects)
               position: [#objects == 1 and position == a.position]   (only if a has one)
  quality  = (whiteness + saturation) / 2, where
               whiteness  = mean over background pixels (outside the objects, dilated by 1 px)
                            of min_c x_c   (1 for a clean white background)
               saturation = mean HSV saturation of the objects' core pixels (0 without objects)
  gold     = (1 - quality_weight) fidelity + quality_weight quality.
"""
import colorsys

import numpy as np
from scipy import ndimage

from tdpo_jax.shapes import world

INK_THRESHOLD = 0.35      # anti-aliased edge pixels with >~40% coverage count as object
CORE_THRESHOLD = 0.6      # pixels used for an object's colour (interior, not the blended edge)
MIN_AREA = 8              # smaller blobs are noise (the smallest world shape covers ~24 px)
MIN_SATURATION = 0.25     # below: grey / black / washed-out, no world colour
TRIANGLE_MIN_SKEW = 0.08  # between 0 (disc, square) and 1/6 (upright triangle)
CIRCLE_MAX_FILL = 0.89    # between pi/4 (disc) and 1 (square)
POSITION_MIN_OFFSET = 3.0
QUALITY_WEIGHT = 0.2
_EIGHT_CONNECTED = np.ones((3, 3), bool)
_HUES = {name: colorsys.rgb_to_hsv(*(np.asarray(rgb) / 255.0))[0]
         for name, rgb in world.COLOURS.items()}


def _as_float(image):
  """(S, S, 3) uint8 or float -> float64 in [0, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image has shape {image.shape}; expected (H, W, 3)")
  if np.issubdtype(image.dtype, np.integer):
    return image.astype(np.float64) / 255.0
  return np.clip(image.astype(np.float64), 0.0, 1.0)


def _nearest_colour(rgb):
  """World colour name nearest in hue to an RGB triple in [0, 1], or None if unsaturated."""
  hue, saturation, _ = colorsys.rgb_to_hsv(*rgb)
  if saturation < MIN_SATURATION:
    return None

  def distance(name):
    delta = abs(hue - _HUES[name])
    return min(delta, 1.0 - delta)

  return min(_HUES, key=distance)


def _shape_of(component):
  """(shape name, fill ratio, skew) of a boolean component cropped to its bounding box."""
  height = component.shape[0]
  rows = np.nonzero(component)[0]
  skew = (rows.mean() - (height - 1) / 2) / height
  fill = component.mean()
  if skew >= TRIANGLE_MIN_SKEW:
    return "triangle", float(fill), float(skew)
  return ("circle" if fill < CIRCLE_MAX_FILL else "square"), float(fill), float(skew)


def position_of(centre, size=world.IMAGE_SIZE):
  """"left" / "right" / "top" / "bottom" / "centre" of a centroid (x, y) in pixels."""
  dx, dy = centre[0] - (size - 1) / 2, centre[1] - (size - 1) / 2
  if max(abs(dx), abs(dy)) < POSITION_MIN_OFFSET:
    return "centre"
  if abs(dx) >= abs(dy):
    return "left" if dx < 0 else "right"
  return "top" if dy < 0 else "bottom"


def detect(image):
  """Objects of one image.

  Args:
    image: (S, S, 3) uint8 or float in [0, 1].
  Returns:
    (objects, object_mask): objects a list of dicts with keys colour (name or None), shape,
    area (px), fill, skew, centre (x, y), position, saturation; object_mask (S, S) bool.
  """
  image = _as_float(image)
  ink = 1.0 - image.min(axis=-1)
  labels, num = ndimage.label(ink > INK_THRESHOLD, structure=_EIGHT_CONNECTED)
  objects = []
  object_mask = np.zeros(ink.shape, bool)
  for label, box in enumerate(ndimage.find_objects(labels), start=1):
    component = labels[box] == label
    area = int(component.sum())
    if area < MIN_AREA:
      continue
    object_mask[box] |= component
    core = component & (ink[box] > CORE_THRESHOLD)
    pixels = image[box][core if core.any() else component]
    rgb = pixels.mean(axis=0)
    ys, xs = np.nonzero(component)
    centre = (float(xs.mean() + box[1].start), float(ys.mean() + box[0].start))
    saturation = np.array([colorsys.rgb_to_hsv(*p)[1] for p in pixels]).mean()
    shape, fill, skew = _shape_of(component)
    objects.append(dict(colour=_nearest_colour(rgb), shape=shape, area=area, fill=fill, skew=skew,
                        centre=centre, position=position_of(centre, ink.shape[1]),
                        saturation=float(saturation)))
  return objects, object_mask


def attribute_scores(objects, attributes):
  """{"count", "colour", "shape"[, "position"]} in [0, 1] (module docstring) for one image."""
  scores = {"count": float(len(objects) == attributes["count"])}
  for key in ("colour", "shape"):
    scores[key] = (float(np.mean([o[key] == attributes[key] for o in objects])) if objects
                   else 0.0)
  if attributes["position"] is not None:
    scores["position"] = float(len(objects) == 1 and
                               objects[0]["position"] == attributes["position"])
  return scores


def quality(image, objects, object_mask):
  """(whiteness + saturation) / 2 of one image (module docstring), in [0, 1]."""
  image = _as_float(image)
  background = ~ndimage.binary_dilation(object_mask, structure=_EIGHT_CONNECTED)
  whiteness = float(image.min(axis=-1)[background].mean()) if background.any() else 0.0
  saturation = float(np.mean([o["saturation"] for o in objects])) if objects else 0.0
  return 0.5 * (whiteness + saturation)


def score(image, prompt, quality_weight=QUALITY_WEIGHT):
  """{"gold", "fidelity", "quality", and the attribute scores} of one image and its prompt."""
  attributes = world.parse_prompt(prompt)
  objects, object_mask = detect(image)
  scores = attribute_scores(objects, attributes)
  fidelity = float(np.mean(list(scores.values())))
  image_quality = quality(image, objects, object_mask)
  return dict(scores, fidelity=fidelity, quality=image_quality,
              gold=(1 - quality_weight) * fidelity + quality_weight * image_quality)


def gold_reward(images, prompts, quality_weight=QUALITY_WEIGHT):
  """The gold reward: (B, S, S, 3) images in [0, 1] (or uint8), B prompts -> (B,) float32."""
  images = np.asarray(images)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one each")
  return np.asarray([score(image, text, quality_weight)["gold"]
                     for image, text in zip(images, prompts)], np.float32)


def gold_fidelity(images, prompts):
  """The fidelity term of gold alone: (B, S, S, 3) images, B prompts -> (B,) float32 in [0, 1]."""
  return _score_term(images, prompts, "fidelity")


def gold_quality(images, prompts):
  """The quality term of gold alone (prompt-independent): -> (B,) float32 in [0, 1]."""
  return _score_term(images, prompts, "quality")


def _score_term(images, prompts, key):
  images = np.asarray(images)
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} images but {len(prompts)} prompts; expected one each")
  return np.asarray([score(image, text)[key] for image, text in zip(images, prompts)],
                    np.float32)


def attribute_rates(images, prompts, quality_weight=QUALITY_WEIGHT):
  """Mean colour / shape / count / position scores, fidelity, quality and gold over a batch.

  "position" averages over the prompts that state one (NaN if none do).
  """
  rows = [score(image, text, quality_weight) for image, text in zip(np.asarray(images), prompts)]
  keys = ("colour", "shape", "count", "position", "fidelity", "quality", "gold")
  rates = {}
  for key in keys:
    values = [row[key] for row in rows if key in row]
    rates[key] = float(np.mean(values)) if values else float("nan")
  return rates
