"""Writes the UNet/VAE golden files of tests/test_models_unet.py and test_models_vae.py.

Run once, with diffusers <= 0.39 (which still has `FlaxUNet2DConditionModel` and
`FlaxAutoencoderKL`) and torch, from the repo root:
  python tests/golden/make_diffusers_golden.py
Outputs (next to this script):
  unet_tiny_tree.json   TINY_UNET (an SD1.x-like config) + the sorted "path shape" lines of
                        the params of diffusers' `FlaxUNet2DConditionModel`;
  vae_tiny_tree.json    TINY_VAE + those of diffusers' `FlaxAutoencoderKL`;
  diffusers_shipped_outputs.npz
                        outputs of the shipped shapes-world UNet and VAE
                        (tdpo_jax/shapes/assets/pipeline/{unet,vae}) on `golden_inputs()`, float32,
                        computed twice: by diffusers' Flax classes as the project ran them (with
                        `flax_fixes`, the exact GELU), keys `*_diffusers_flax`, and by diffusers'
                        PyTorch classes on the same weights, keys `*_torch`:
                          unet_eps_*      (2, 4, 8, 8) NCHW, eps at timesteps UNET_TIMESTEPS;
                          vae_decode_*    (1, 16, 16, 3) NHWC, decode of the 4x4 latents;
                          vae_mean_*, vae_logvar_*  (1, 4, 4, 4) NHWC, encode of that image.
The tests read only these files, so they keep working once diffusers' Flax classes are gone.
Importing this module needs only NumPy (the configs and `golden_inputs` are shared with the tests).
"""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHIPPED = os.path.join(REPO, "tdpo_jax", "shapes", "assets", "pipeline")
OUTPUTS_NAME = "diffusers_shipped_outputs.npz"
UNET_TREE_NAME, VAE_TREE_NAME = "unet_tiny_tree.json", "vae_tiny_tree.json"

# SD1.x-like: three levels (CrossAttn, CrossAttn, plain), attention_head_dim = the head count,
# 1x1-conv projections, two layers per block, and a non-default norm_num_groups.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 32, 64],
    layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=4, cross_attention_dim=24, norm_num_groups=16)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    layers_per_block=2, norm_num_groups=8, sample_size=32)

# The shipped shapes-world UNet reads (B, 16, 64) text embeddings (its CLIP has 16 positions).
UNET_BATCH, UNET_LATENT_SHAPE, UNET_CONTEXT_SHAPE = 2, (4, 8, 8), (16, 64)
UNET_TIMESTEPS = (21, 901)
VAE_LATENT_SHAPE = (1, 4, 4, 4)  # NHWC; the shipped VAE upsamples 4x: 16x16 images


def _pattern(shape, frequency, phase=0.0):
  """A smooth deterministic array of magnitude <= 1 (no RNG: identical on every machine)."""
  index = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
  return (np.sin(frequency * index + phase) * np.cos(0.013 * index)).astype(np.float32)


def golden_inputs():
  """The inputs of the shipped-model goldens, float32.

  Returns:
    dict: unet_latents (2, 4, 8, 8) NCHW (unit-ish scale), unet_timesteps (2,),
    unet_context (2, 16, 64), vae_latents (1, 4, 4, 4) NHWC, vae_images (1, 16, 16, 3) NHWC in
    [-1, 1] (the encode input).
  """
  return {
      "unet_latents": 2.0 * _pattern((UNET_BATCH,) + UNET_LATENT_SHAPE, 0.37),
      "unet_timesteps": np.asarray(UNET_TIMESTEPS, np.float32),
      "unet_context": 2.0 * _pattern((UNET_BATCH,) + UNET_CONTEXT_SHAPE, 0.23, 0.5),
      "vae_latents": 2.0 * _pattern(VAE_LATENT_SHAPE, 0.41, 1.0),
      "vae_images": _pattern((1, 16, 16, 3), 0.17, 0.3),
  }


def tree_lines(params):
  """Sorted "a/b/kernel (3, 4)" lines of a param tree (arrays or ShapeDtypeStructs)."""
  import flax.traverse_util  # pylint: disable=import-outside-toplevel
  return sorted(f"{'/'.join(path)} {tuple(value.shape)}"
                for path, value in flax.traverse_util.flatten_dict(params).items())


def read_shipped(name):
  """(config dict, float32 NumPy params) of the shipped shapes-world `unet` or `vae`.

  The msgpack stores float16 values (the pretraining export); they are cast to float32, as
  `pipeline.load_pipeline` does.
  """
  import flax.serialization  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  directory = os.path.join(SHIPPED, name)
  with open(os.path.join(directory, "config.json")) as file:
    config = json.load(file)
  with open(os.path.join(directory, "diffusion_flax_model.msgpack"), "rb") as file:
    params = flax.serialization.msgpack_restore(file.read())
  return config, jax.tree.map(lambda value: np.asarray(value, np.float32), params)


def _write_json(name, content):
  with open(os.path.join(HERE, name), "w") as file:
    json.dump(content, file, indent=1, sort_keys=True)
    file.write("\n")


def main():
  # pylint: disable=import-outside-toplevel
  import diffusers
  import jax
  import jax.numpy as jnp
  import torch

  from tdpo_jax.models import diffusers_weights
  from tdpo_jax.models import flax_fixes

  diffusers.utils.logging.set_verbosity_error()
  flax_fixes.apply()  # the exact GELU, as the project ran diffusers' Flax UNet
  rng = jax.random.key(0)
  for name, config, flax_class in ((UNET_TREE_NAME, TINY_UNET, diffusers.FlaxUNet2DConditionModel),
                                   (VAE_TREE_NAME, TINY_VAE, diffusers.FlaxAutoencoderKL)):
    module = flax_class.from_config(config)
    _write_json(name, {"config": config,
                       "tree": tree_lines(jax.eval_shape(module.init_weights, rng))})

  inputs = golden_inputs()
  outputs = {}
  unet_config, unet_params = read_shipped("unet")
  flax_unet = diffusers.FlaxUNet2DConditionModel.from_config(unet_config)
  outputs["unet_eps_diffusers_flax"] = np.asarray(flax_unet.apply(
      {"params": unet_params}, jnp.asarray(inputs["unet_latents"]),
      jnp.asarray(inputs["unet_timesteps"]), jnp.asarray(inputs["unet_context"])).sample)
  torch_unet = diffusers.UNet2DConditionModel.from_config(unet_config).eval()
  torch_unet.load_state_dict({key: torch.from_numpy(value) for key, value in
                              diffusers_weights.flax_to_pytorch(unet_params).items()})
  with torch.no_grad():
    outputs["unet_eps_torch"] = torch_unet(
        torch.from_numpy(inputs["unet_latents"]), torch.from_numpy(inputs["unet_timesteps"]),
        torch.from_numpy(inputs["unet_context"])).sample.numpy()

  vae_config, vae_params = read_shipped("vae")
  flax_vae = diffusers.FlaxAutoencoderKL.from_config(vae_config)
  variables = {"params": vae_params}
  decoded = np.asarray(flax_vae.apply(variables, jnp.asarray(inputs["vae_latents"]),
                                      method=flax_vae.decode).sample)  # NCHW out
  outputs["vae_decode_diffusers_flax"] = decoded.transpose(0, 2, 3, 1)
  images_nchw = inputs["vae_images"].transpose(0, 3, 1, 2)
  posterior = flax_vae.apply(variables, jnp.asarray(images_nchw),
                             method=flax_vae.encode).latent_dist  # NHWC moments
  outputs["vae_mean_diffusers_flax"] = np.asarray(posterior.mean)
  outputs["vae_logvar_diffusers_flax"] = np.asarray(posterior.logvar)
  torch_vae = diffusers.AutoencoderKL.from_config(vae_config).eval()
  torch_vae.load_state_dict({key: torch.from_numpy(value) for key, value in
                             diffusers_weights.flax_to_pytorch(vae_params).items()})
  with torch.no_grad():
    latents_nchw = torch.from_numpy(inputs["vae_latents"].transpose(0, 3, 1, 2).copy())
    outputs["vae_decode_torch"] = torch_vae.decode(latents_nchw).sample.numpy().transpose(
        0, 2, 3, 1)
    torch_posterior = torch_vae.encode(torch.from_numpy(images_nchw.copy())).latent_dist
    outputs["vae_mean_torch"] = torch_posterior.mean.numpy().transpose(0, 2, 3, 1)
    outputs["vae_logvar_torch"] = torch_posterior.logvar.numpy().transpose(0, 2, 3, 1)
  np.savez_compressed(os.path.join(HERE, OUTPUTS_NAME),
                      **{key: np.ascontiguousarray(value, np.float32)
                         for key, value in outputs.items()})


if __name__ == "__main__":
  main()
