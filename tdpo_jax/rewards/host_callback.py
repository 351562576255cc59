"""Host-side rewards: any Python callable (a PyTorch model included) as a `reward_fn`.

Shape legend: B batch, H/W image height/width. The wrapped reward takes images (B, H, W, 3)
float in [0, 1] (NumPy or JAX, on any device: they are copied to the host) and B prompts, and
returns (B,) float32 NumPy. The callable sees what a PyTorch reward model's own preprocessing
expects: B PIL RGB images (or a (B, H, W, 3) uint8 array with `image_format="uint8"`),
quantised as `round(255 x)` clipped to [0, 255] (as the JPEG rewards and DDPO do), and the prompts
as a list of str; it returns B numbers.

Host rewards run outside the jitted kernels, between the rollout and the advantage computation
(like the JPEG rewards); they cost one device->host copy of the images per call.

Example: ImageReward's own PyTorch package, with `pip install image-reward` (the Flax port that
runs on the mesh is the model reward `image_reward`, `rewards/image_reward.py`):

    import ImageReward

    model = ImageReward.load("ImageReward-v1.0", device="cuda")  # or a local .pt checkpoint path

    def image_reward(images, prompts):
      return [model.score(prompt, image) for image, prompt in zip(images, prompts)]

    host_callback.register_host_reward("imagereward", image_reward)
    reward_fn = rewards.get("imagereward")

`imagereward_fn(model_name, device)` does exactly this, and `rewards.make_reward_fn("imagereward",
config.rewards)` calls it with `config.rewards.imagereward.model` / `.device`.
"""
import importlib

import numpy as np
from PIL import Image

from tdpo_jax.rewards import jpeg
from tdpo_jax.rewards import registry

IMAGE_FORMATS = ("pil", "uint8")


def host_reward_fn(fn, name, image_format="pil"):
  """Wraps `fn(images, prompts) -> B numbers` into `reward_fn(images, prompts) -> (B,) float32`.

  Args:
    fn: the Python callable; receives a list of B PIL images (image_format="pil") or a (B, H, W, 3)
      uint8 array (image_format="uint8"), and a list of B prompts.
    name: the reward's name, for error messages.
    image_format: "pil" or "uint8".
  Returns:
    reward_fn(images (B, H, W, 3) float in [0, 1], prompts) -> np.float32 (B,).
  """
  if image_format not in IMAGE_FORMATS:
    raise ValueError(f"image_format={image_format!r} for reward {name!r}; expected one of "
                     f"{IMAGE_FORMATS}")
  if not callable(fn):
    raise ValueError(f"reward {name!r}: got a {type(fn).__name__}, expected a callable "
                     "fn(images, prompts) -> sequence of floats")

  def reward_fn(images, prompts):
    uint8_images = jpeg.to_uint8(np.asarray(images))  # device -> host copy
    batch = uint8_images.shape[0]
    prompts = list(prompts)
    if len(prompts) != batch:
      raise ValueError(f"reward {name!r}: got {len(prompts)} prompts for {batch} images; "
                       "expected one prompt per image")
    inputs = ([Image.fromarray(image) for image in uint8_images] if image_format == "pil"
              else uint8_images)
    scores = np.asarray(fn(inputs, prompts), dtype=np.float32).reshape(-1)
    if scores.shape != (batch,):
      raise ValueError(f"reward {name!r} returned {scores.shape[0]} values for {batch} images; "
                       "expected one number per image")
    return scores

  return reward_fn


def register_host_reward(name, fn, image_format="pil"):
  """Registers `host_reward_fn(fn, name, image_format)` under `name`; returns the reward_fn."""
  reward_fn = host_reward_fn(fn, name, image_format)
  registry.register(name, reward_fn)
  return reward_fn


def imagereward_fn(model_name="ImageReward-v1.0", device="cpu"):
  """ImageReward as a host reward (needs the `image-reward` package and its weights).

  Args:
    model_name: "ImageReward-v1.0" (downloaded by ImageReward) or a local checkpoint path.
    device: the PyTorch device string, e.g. "cuda" or "cpu".
  """
  try:
    image_reward_lib = importlib.import_module("ImageReward")
  except ImportError as error:
    raise ValueError("reward 'imagereward' needs the ImageReward package (pip install "
                     "image-reward); it is not installed") from error
  model = image_reward_lib.load(model_name, device=device)

  def score(images, prompts):
    return [float(model.score(prompt, image)) for image, prompt in zip(images, prompts)]

  return host_reward_fn(score, "imagereward")
