"""The gold reward's detector and score on rendered scenes (the renderer is the reference)."""
import numpy as np
import pytest

from tdpo_jax.shapes import gold
from tdpo_jax.shapes import world


def test_detector_recovers_the_attributes_of_rendered_scenes():
  rng = np.random.default_rng(123)
  for _ in range(400):
    scene = world.sample_scene(rng)
    objects, _ = gold.detect(world.render(scene))
    assert len(objects) == scene.count
    assert {o["colour"] for o in objects} == {scene.colour}
    assert {o["shape"] for o in objects} == {scene.shape}
    if scene.position is not None:
      assert objects[0]["position"] == scene.position
    # Centroids match the drawn centres (triangles: 1/6 of the size below the bbox centre).
    drawn = [(s.centre[0] - 0.5, s.centre[1] - 0.5 + (s.size / 6 if s.kind == "triangle"
                                                            else 0)) for s in scene.shapes]
    for centre in drawn:  # each drawn centre has a detected centroid within 1 px
      assert min(np.hypot(*np.subtract(o["centre"], centre)) for o in objects) <= 1.0


def test_scores_are_one_for_matching_renders():
  images, prompts = world.batch(0, 0, 64)
  rates = gold.attribute_rates(images, prompts)
  for key in ("colour", "shape", "count", "position", "fidelity"):
    assert rates[key] == 1.0, key


@pytest.mark.parametrize("wrong, key", [
    ("a blue circle", "colour"), ("a red square", "shape"), ("two red circles", "count"),
    ("a red circle on the right", "position")])
def test_each_mismatched_attribute_costs_its_share(wrong, key):
  scene = world.make_scene(np.random.default_rng(0), "red", "circle", 1, "left")
  image = world.render(scene)
  right = gold.score(image, world.prompt(scene))
  other = gold.score(image, wrong)
  assert right["fidelity"] == 1.0 and other[key] == 0.0
  # fidelity is the mean over the prompt's attributes: one of 3 (no position) or 4 wrong.
  attributes = 4 if "on the" in wrong else 3
  assert other["fidelity"] == pytest.approx(1 - 1 / attributes)
  assert other["gold"] < right["gold"]


def test_quality_falls_with_noise_and_tint_and_gold_is_in_range():
  rng = np.random.default_rng(2)
  scene = world.make_scene(rng, "yellow", "triangle", 1)
  clean = world.render(scene) / 255.0
  text = world.prompt(scene)
  noisy = np.clip(clean + rng.normal(0, 0.15, clean.shape), 0, 1)
  tinted = clean * np.asarray([1.0, 0.85, 0.85])
  scores = [gold.score(image, text) for image in (clean, noisy, tinted)]
  assert scores[0]["quality"] > scores[1]["quality"] and scores[0]["quality"] > scores[2]["quality"]
  assert scores[0]["gold"] > scores[1]["gold"] and scores[0]["gold"] > scores[2]["gold"]
  assert all(0.0 <= s["gold"] <= 1.0 for s in scores)
  blank = np.ones_like(clean)
  assert gold.score(blank, text)["fidelity"] == 0.0  # nothing detected: count, colour, shape 0


def test_gold_reward_batches_and_checks_lengths():
  images, prompts = world.batch(0, 1, 4)
  rewards = gold.gold_reward(images / 255.0, prompts)
  assert rewards.shape == (4,) and rewards.dtype == np.float32
  np.testing.assert_allclose(rewards, [gold.score(i, p)["gold"] for i, p in zip(images, prompts)],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="3 prompts"):
    gold.gold_reward(images, prompts[:3])


def test_grey_blobs_have_no_colour():
  image = np.full((32, 32, 3), 255, np.uint8)
  image[10:20, 10:20] = 90
  (obj,), _ = gold.detect(image)
  assert obj["colour"] is None and obj["shape"] == "square"


def test_gold_is_registered_as_a_reward():
  from tdpo_jax import rewards  # pylint: disable=import-outside-toplevel
  from tdpo_jax.shapes import rewards as shapes_rewards  # pylint: disable=import-outside-toplevel
  assert "shapes_gold" in shapes_rewards.FUNCTION_REWARDS  # importing it registers them
  reward_fn = rewards.make_reward_fn("shapes_gold", None)
  images, prompts = world.batch(0, 2, 3)
  np.testing.assert_allclose(reward_fn(images / 255.0, prompts),
                             gold.gold_reward(images / 255.0, prompts))


def test_gold_terms_are_registered_rewards():
  from tdpo_jax import rewards  # pylint: disable=import-outside-toplevel
  rewards.import_reward_modules(["tdpo_jax.shapes.rewards"])  # as an entry point does
  images, prompts = world.batch(0, 2, 3)
  images = images / 255.0
  fidelity = rewards.make_reward_fn("shapes_gold_fidelity", None)(images, prompts)
  quality = rewards.make_reward_fn("shapes_gold_quality", None)(images, prompts)
  scores = [gold.score(image, text) for image, text in zip(images, prompts)]
  np.testing.assert_allclose(fidelity, [s["fidelity"] for s in scores], rtol=1e-6)
  np.testing.assert_allclose(quality, [s["quality"] for s in scores], rtol=1e-6)
  np.testing.assert_allclose((1 - gold.QUALITY_WEIGHT) * fidelity + gold.QUALITY_WEIGHT * quality,
                             gold.gold_reward(images, prompts), rtol=1e-5)


def test_shapes_config_uses_the_world():
  from tests import helpers  # pylint: disable=import-outside-toplevel
  config = helpers.load_config("shapes")
  assert config.reward == "shapes_aesthetic" and config.prompts == "shapes_train"
  assert config.critic.tower == "shapes_aesthetic"
  assert {"shapes_gold", "shapes_gold_fidelity", "shapes_gold_quality", "shapes_proxy"} <= set(
      config.eval.rewards) and config.eval.every == 1
  proxy = helpers.load_config("shapes", "reward=proxy")
  assert (proxy.reward, proxy.critic.tower) == ("shapes_proxy", "image_encoder")
  kl = helpers.load_config("shapes", "algorithm=ddpo_kl")
  assert (kl.algorithm, kl.train.kl_mode) == ("ddpo", "gaussian") and kl.train.kl_coef > 0
  grpo = helpers.load_config("shapes", "algorithm=grpo")
  assert grpo.algorithm == "grpo" and grpo.sample.group_size >= 2
  assert config.sample.group_size == 0
  assert (config.sample.height, config.sample.width) == (world.IMAGE_SIZE, world.IMAGE_SIZE)
  gold_ddpo = helpers.load_config("shapes", "algorithm=ddpo,reward=gold")
  assert (gold_ddpo.reward, gold_ddpo.algorithm) == ("shapes_gold", "ddpo")
  redo = helpers.load_config("shapes", "algorithm=redo")
  assert (redo.algorithm, redo.reset.target) == ("tdpo_r", "dormant")
  with pytest.raises(ValueError, match="unknown algorithm preset 'ppo'"):
    helpers.load_config("shapes", "algorithm=ppo")
