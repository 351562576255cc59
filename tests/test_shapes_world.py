"""The shapes world: prompt grammar, determinism, and rendered geometry/colour."""
import numpy as np
import pytest

from tdpo_jax.shapes import world


def test_every_prompt_round_trips_through_the_parser():
  prompts = world.all_prompts()
  assert len(prompts) == len(set(prompts)) == len(world.COLOURS) * len(world.SHAPES) * 6
  for text in prompts:
    attributes = world.parse_prompt(text)
    assert world.prompt_of(**attributes) == text


@pytest.mark.parametrize("text", ["a red circles", "two red circle", "three red circles",
                                  "a purple circle", "two red circles on the left",
                                  "a red circle in the middle", ""])
def test_parse_rejects_non_world_prompts(text):
  with pytest.raises(ValueError, match="not a shapes-world prompt"):
    world.parse_prompt(text)


def test_batches_are_deterministic_in_seed_and_index():
  images_a, prompts_a = world.batch(3, 7, 8)
  images_b, prompts_b = world.batch(3, 7, 8)
  images_c, prompts_c = world.batch(3, 8, 8)
  np.testing.assert_array_equal(images_a, images_b)
  assert prompts_a == prompts_b
  assert prompts_a != prompts_c or not np.array_equal(images_a, images_c)
  first, second = next(world.batches(3, 8, start=7)), world.batch(3, 7, 8)
  np.testing.assert_array_equal(first[0], second[0])


def test_render_draws_the_scene_colour_on_white():
  rng = np.random.default_rng(0)
  for _ in range(50):
    scene = world.sample_scene(rng)
    image = world.render(scene).astype(int)
    assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    white = np.all(image == 255, axis=-1)
    colour = np.all(image == world.COLOURS[scene.colour], axis=-1)
    # Every pixel is white, the exact scene colour, or an anti-aliased blend of the two.
    assert white.mean() > 0.5 and colour.sum() > 0
    blend = np.asarray(world.COLOURS[scene.colour]) - 255
    for pixel in image[~white & ~colour]:
      weight = (pixel - 255) @ blend / (blend @ blend)
      np.testing.assert_allclose(pixel, 255 + weight * blend, atol=1.0)


def test_shape_areas_match_their_closed_forms():
  # Area of the drawn (anti-aliased) shape in pixels vs size^2 * (1, pi/4, 1/2).
  expected = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
  for kind, ratio in expected.items():
    scene = world.Scene("red", kind, 1, None, (world.Shape(kind, 14, (16.0, 16.0)),))
    image = world.render(scene).astype(float)
    coverage = (255 - image[..., 1]) / (255 - world.COLOURS["red"][1])
    assert coverage.sum() == pytest.approx(14 * 14 * ratio, rel=0.06)


def test_positions_and_pairs_are_placed_as_stated():
  rng = np.random.default_rng(1)
  for position, (dx, dy) in world.POSITION_DIRECTIONS.items():
    for _ in range(20):
      scene = world.make_scene(rng, "blue", "square", 1, position)
      (shape,) = scene.shapes
      offset = np.subtract(shape.centre, world.IMAGE_SIZE / 2)
      along = offset @ (dx, dy)
      across = offset @ (dy, dx)
      assert along >= world.POSITION_OFFSET[0] - 1e-9  # clipping to the image keeps it >= 6
      assert along > abs(across)
  for _ in range(50):
    scene = world.make_scene(rng, "green", "circle", 2)
    first, second = scene.shapes
    gap = max(abs(first.centre[0] - second.centre[0]), abs(first.centre[1] - second.centre[1]))
    assert gap - (first.size + second.size) / 2 >= world.PAIR_GAP


def test_bad_attributes_raise():
  with pytest.raises(ValueError, match="bad position"):
    world.make_scene(np.random.default_rng(0), "red", "circle", 2, "left")
  with pytest.raises(ValueError, match="bad attributes"):
    world.prompt_of("purple", "circle", 1)


def test_shipped_prompt_set_is_the_world():
  from tdpo_jax import prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  assert prompts_lib.load_prompts("shapes_world") == tuple(world.all_prompts())
  # The RL prompts are world prompts: each parses, and the gold reward can score it.
  train_prompts = prompts_lib.load_prompts("shapes_train")
  assert len(train_prompts) == 8 and set(train_prompts) <= set(world.all_prompts())
