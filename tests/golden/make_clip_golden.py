"""Writes the CLIP golden files of tests/test_models_clip.py from transformers 4.x's Flax CLIP.

Run once, with transformers < 5 (which still has `modeling_flax_clip`), from the repo root:
  python tests/golden/make_clip_golden.py
Outputs (next to this script):
  clip_text_tiny_tree.json    TINY_TEXT config + the sorted "path shape" lines of the params of
                              FlaxCLIPTextModule and FlaxCLIPTextModelWithProjectionModule;
  clip_vision_tiny_tree.json  TINY_VISION config + those of `image_encoder.ImageEncoder` (the
                              Flax vision transformer + visual_projection, the project's
                              CLIPVisionModelWithProjection) and FlaxCLIPVisionModule;
  clip_model_tiny_tree.json   both configs + projection_dim + those of FlaxCLIPModule;
  clip_shipped_outputs.npz    outputs of the shipped shapes-world towers
                              (tdpo_jax/shapes/assets/pipeline/{text_encoder,image_encoder}) on
                              `golden_inputs()`, computed by the Flax classes in float32
                              (weights loaded by `models.pipeline`, float16 on disk -> float32).
The test reads only these files, so it keeps working once transformers' Flax classes are gone.
Importing this module needs only NumPy (`golden_inputs` is shared with the test).
"""
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SHIPPED = os.path.join(REPO, "tdpo_jax", "shapes", "assets", "pipeline")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
               "projection_dim", "eos_token_id")
VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps",
                 "projection_dim")
# Small, deliberately uneven sizes (F not a multiple of D, N = (24 // 6)² = 16 patches).
TINY_TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, projection_dim=24, eos_token_id=97)
TINY_VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                   num_attention_heads=4, num_channels=3, image_size=24, patch_size=6,
                   hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24)
TINY_CLIP_PROJECTION_DIM = 20
# Shipped text tower: bos 512, eos 513 (= pad), 16 positions; two padded prompts.
SHIPPED_INPUT_IDS = np.array([
    [512, 70, 32, 114, 101, 100, 32, 99, 105, 114, 513, 513, 513, 513, 513, 513],
    [512, 84, 119, 111, 32, 98, 108, 117, 101, 32, 115, 113, 117, 97, 114, 513]], np.int32)
SHIPPED_IMAGE_BATCH = 2
# Vision tokens of last_hidden_state kept in the golden file (CLS + 7 patches): a few KB.
SHIPPED_VISION_TOKENS = 8


def golden_inputs(image_size=32, channels=3):
  """(input_ids (2, 16) int32, pixel_values (2, C, S, S) float32 NCHW), no RNG involved.

  The pixel values are a smooth deterministic pattern of CLIP-normalised magnitude (|x| <= 2).
  """
  shape = (SHIPPED_IMAGE_BATCH, channels, image_size, image_size)
  index = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
  pixel_values = 2.0 * np.sin(0.37 * index) * np.cos(0.011 * index)
  return SHIPPED_INPUT_IDS.copy(), pixel_values.astype(np.float32)


def tree_lines(params):
  """Sorted "a/b/kernel (3, 4)" lines of a param tree (arrays or ShapeDtypeStructs)."""
  import flax.traverse_util  # pylint: disable=import-outside-toplevel
  return sorted(f"{'/'.join(path)} {tuple(value.shape)}"
                for path, value in flax.traverse_util.flatten_dict(params).items())


def _write_json(name, content):
  with open(os.path.join(HERE, name), "w") as file:
    json.dump(content, file, indent=1, sort_keys=True)
    file.write("\n")


def main():
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import transformers
  from transformers.models.clip import modeling_flax_clip

  from tdpo_jax.models import image_encoder as image_encoder_lib
  from tdpo_jax.models import pipeline as pipeline_lib

  rng = jax.random.key(0)
  text_config = transformers.CLIPTextConfig(**TINY_TEXT)
  vision_config = transformers.CLIPVisionConfig(**TINY_VISION)
  length = TINY_TEXT["max_position_embeddings"]
  ids = jnp.zeros((1, length), jnp.int32)
  positions = jnp.arange(length)[None]

  def text_tree(module_class):
    module = module_class(config=text_config)
    return tree_lines(jax.eval_shape(
        lambda key: module.init(key, ids, jnp.ones_like(ids), positions)["params"], rng))

  _write_json("clip_text_tiny_tree.json", {
      "config": {name: getattr(text_config, name) for name in TEXT_FIELDS},
      "trees": {"FlaxCLIPTextModule": text_tree(modeling_flax_clip.FlaxCLIPTextModule),
                "FlaxCLIPTextModelWithProjectionModule":
                    text_tree(modeling_flax_clip.FlaxCLIPTextModelWithProjectionModule)}})

  size = TINY_VISION["image_size"]
  encoder = image_encoder_lib.ImageEncoder(config=vision_config, resize_size=size,
                                           crop_size=size)
  vision_module = modeling_flax_clip.FlaxCLIPVisionModule(config=vision_config)
  nhwc = jnp.zeros((1, size, size, TINY_VISION["num_channels"]), jnp.float32)
  _write_json("clip_vision_tiny_tree.json", {
      "config": {name: getattr(vision_config, name) for name in VISION_FIELDS},
      "trees": {"ImageEncoder": tree_lines(jax.eval_shape(encoder.init_weights, rng)),
                "FlaxCLIPVisionModule": tree_lines(jax.eval_shape(
                    lambda key: vision_module.init(key, nhwc)["params"], rng))}})

  clip_config = transformers.CLIPConfig(text_config=text_config.to_dict(),
                                        vision_config=vision_config.to_dict(),
                                        projection_dim=TINY_CLIP_PROJECTION_DIM)
  clip_module = modeling_flax_clip.FlaxCLIPModule(config=clip_config)
  _write_json("clip_model_tiny_tree.json", {
      "config": {"text_config": {name: getattr(clip_config.text_config, name)
                                 for name in TEXT_FIELDS},
                 "vision_config": {name: getattr(clip_config.vision_config, name)
                                   for name in VISION_FIELDS},
                 "projection_dim": clip_config.projection_dim,
                 "logit_scale_init_value": clip_config.logit_scale_init_value},
      "trees": {"FlaxCLIPModule": tree_lines(jax.eval_shape(
          lambda key: clip_module.init(key, ids, nhwc, jnp.ones_like(ids), positions)["params"],
          rng))}})

  # Shipped towers, loaded as the pipeline loads them today (float16 msgpack cast to float32).
  text_module, text_params = pipeline_lib.load_text_encoder(os.path.join(SHIPPED, "text_encoder"))
  image_module, image_params = pipeline_lib.load_image_encoder(
      os.path.join(SHIPPED, "image_encoder"))
  image_config = image_module.config
  input_ids, pixel_values = golden_inputs(image_config.image_size, image_config.num_channels)
  input_ids = jnp.asarray(input_ids)
  text = text_module.apply({"params": text_params}, input_ids, jnp.ones_like(input_ids),
                           jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape))
  vision = modeling_flax_clip.FlaxCLIPVisionTransformer(image_config).apply(
      {"params": image_params["vision_model"]},
      jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1)))
  image_embeds = image_module.apply({"params": image_params}, jnp.asarray(pixel_values))
  np.savez(os.path.join(HERE, "clip_shipped_outputs.npz"),
           text_last_hidden_state=np.asarray(text.last_hidden_state, np.float32),
           text_pooler_output=np.asarray(text.pooler_output, np.float32),
           vision_last_hidden_state=np.asarray(
               vision.last_hidden_state[:, :SHIPPED_VISION_TOKENS], np.float32),
           vision_pooler_output=np.asarray(vision.pooler_output, np.float32),
           image_embeds=np.asarray(image_embeds, np.float32))
  print("wrote the CLIP golden files to", HERE)


if __name__ == "__main__":
  main()
