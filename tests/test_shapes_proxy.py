"""The shapes world's learned proxy reward: data, fit, loading and registration."""
import numpy as np
import pytest

from tdpo_jax import rewards
from tdpo_jax.models import convert
from tdpo_jax.shapes import gold
from tdpo_jax.shapes import proxy
from tdpo_jax.shapes import rewards as shapes_rewards  # noqa: F401  (registers shapes_proxy)
from tdpo_jax.shapes import world


def test_encode_prompts_maps_words_and_pads():
  ids = proxy.encode_prompts(["two red circles", "a blue square on the left", "a purple blob"])
  assert ids.shape == (3, proxy.MAX_WORDS)
  assert [proxy.VOCABULARY[i - 1] for i in ids[0, :3]] == ["two", "red", "circles"]
  assert np.all(ids[0, 3:] == 0) and np.count_nonzero(ids[1]) == 6
  assert ids[2, 1] == 0 and ids[2, 2] == 0  # unknown words


def test_labelled_set_labels_are_gold_and_perturbations_cost_reward():
  images, prompts, labels = proxy.labelled_set(0, 200)
  assert images.shape == (200, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
  np.testing.assert_allclose(labels[:20], [gold.score(i, p)["gold"]
                                           for i, p in zip(images[:20], prompts[:20])], rtol=1e-6)
  clean = gold.gold_reward(*world.batch(0, 0, 200))
  assert labels.mean() < clean.mean() - 0.1 and labels.std() > 0.1
  # Half of the prompts differ from the scene in one attribute: fidelity < 1 for those.
  assert 0.3 < np.mean(labels < 0.8 * clean.min()) < 0.8


def test_fit_beats_the_mean_predictor_and_reward_fn_loads(tmp_path):
  params, train_mse = proxy.train(seed=0, examples=800, steps=400)
  path = str(tmp_path / "proxy.msgpack")
  convert.save_msgpack(params, path)
  images, prompts, labels = proxy.labelled_set(99, 300)
  reward_fn = rewards.make_reward_fn("shapes_proxy", {"shapes_proxy": {"weights": path}})
  predicted = reward_fn(images, prompts)
  assert predicted.shape == (300,) and predicted.dtype == np.float32
  assert np.mean((predicted - labels) ** 2) < labels.var()  # beats predicting the mean
  assert train_mse < labels.var()


def test_empty_weights_is_a_clear_error():
  with pytest.raises(ValueError, match="shapes_proxy.weights is empty"):
    rewards.make_reward_fn("shapes_proxy", {"shapes_proxy": {"weights": ""}})
