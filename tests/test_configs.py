"""configs/sd15.py presets for the paper's runs, and configs/tiny.py's evaluation settings.

Each preset validates (its prompt sets exist, its eval rewards are registered); the held-out
prompt sets share no prompt with the training sets they evaluate.
"""
import pytest

from tdpo_jax import config_checks
from tdpo_jax import prompts as prompts_lib
from tests import helpers


@pytest.mark.parametrize("arg, reward, prompts, heldout, model", [
    (None, "aesthetic", "simple_animals", "unseen_animals", "runwayml/stable-diffusion-v1-5"),
    ("reward=pickscore", "pickscore", "simple_animals", "unseen_animals",
     "runwayml/stable-diffusion-v1-5"),
    ("reward=hpsv2", "hpsv2", "hpsv2_photo", "hpsv2_photo_eval", "runwayml/stable-diffusion-v1-5"),
    ("reward=hpsv2,sd14", "hpsv2", "hpsv2_photo", "hpsv2_photo_eval",
     "CompVis/stable-diffusion-v1-4"),
    ("sd14,algorithm=ddpo", "aesthetic", "simple_animals", "unseen_animals",
     "CompVis/stable-diffusion-v1-4"),
])
def test_paper_presets(arg, reward, prompts, heldout, model):
  config = helpers.load_config("sd15", arg)
  assert (config.reward, config.prompts, config.eval.prompts) == (reward, prompts, heldout)
  assert config.pretrained.model == model
  # The paper's cross-reward evaluation: all four model rewards.
  assert set(config.eval.rewards) == {"aesthetic", "pickscore", "hpsv2", "image_reward"}
  config_checks.validate_config(config)
  train_set = set(prompts_lib.load_prompts(config.prompts))
  heldout_set = prompts_lib.load_prompts(config.eval.prompts)
  assert not train_set & set(heldout_set)
  # The default held-out sample count fills whole rollout batches.
  count = (config.eval.num_prompts or len(heldout_set)) * config.eval.samples_per_prompt
  assert count % config.sample.batch_size == 0


def test_hpsv2_photo_prompts_ship():
  assert len(prompts_lib.load_prompts("hpsv2_photo")) == 50
  assert all("photo" in p for p in prompts_lib.load_prompts("hpsv2_photo"))


def test_unknown_reward_preset_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown reward preset 'clip'; expected one of "
                                       r"\['aesthetic', 'hpsv2', 'pickscore'\]"):
    helpers.load_config("sd15", "reward=clip")


def test_tiny_evaluates_cheaply_on_its_mesh():
  config = helpers.load_config("tiny")
  config_checks.validate_config(config)
  assert config.eval.every == 2 and config.eval.diversity
  assert set(config.eval.rewards) == {"jpeg_compressibility", "jpeg_incompressibility"}
  assert config.eval.num_prompts * config.eval.samples_per_prompt == config.sample.batch_size
  assert not config.log.wandb.enabled


def test_random_preset_builds_the_published_sd15_sizes():
  """`sd15.py:random`'s architecture has SD 1.5's published parameter counts (UNet 859,520,964;
  VAE 83,653,863; CLIP-L text 123,060,480; CLIP-L/14 vision + projection 303,966,208), and the
  preset runs offline (a "tiny:" model, a weight-free reward, no evaluation)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tdpo_jax.models import pipeline  # pylint: disable=import-outside-toplevel
  config = helpers.load_config("sd15", "random")
  config_checks.validate_config(config)
  assert config.pretrained.model == "tiny:0" and config.eval.every == 0
  assert config.reward == "jpeg_compressibility"
  abstract = pipeline.abstract_pipeline(config.pretrained.tiny)  # what memory.py compiles
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  counts = {"unet": count(abstract.unet_params), "vae": count(abstract.vae_params),
            "text": count(abstract.text_encoder_params),
            "vision": count(abstract.image_encoder_params)}
  assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480,
                    "vision": 303_966_208}
