"""The shapes-world model: SD's architecture (`models.unet`, `vae`, `clip`) at small size, its
tokenizer, init and export.

Shape legend: B batch, L text length (`spec.text_encoder.max_position_embeddings`, 16), D text
width, latents NCHW (4, 8, 8), images NHWC (32, 32, 3).

The tokenizer is a CLIP BPE tokenizer whose merges build every word of the world's vocabulary
into one token (`world.vocabulary()`); any other text falls back to the byte-level characters of
`models/tiny_tokenizer`, so every prompt still tokenizes.

`export_pipeline` writes the diffusers directory layout that `models.pipeline.load_pipeline`
reads (msgpack weights, optionally stored as float16; the loader casts them to float32).
"""
import json
import os

import flax.traverse_util
import jax
import numpy as np
import transformers

from tdpo_jax.models import convert
from tdpo_jax.models import image_encoder as image_encoder_lib
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.models import tiny
from tdpo_jax.models import unet as unet_lib
from tdpo_jax.models import vae as vae_lib
from tdpo_jax.shapes import world

END_OF_WORD = "</w>"
_COMPONENT_STREAMS = {"unet": 1, "vae": 2, "text_encoder": 3, "image_encoder": 4}


# ---------------------------------------------------------------------------------------------
# Tokenizer.


def _clip_bpe(word, ranks):
  """CLIP's BPE of one word (as transformers.CLIPTokenizer.bpe): the list of its tokens."""
  parts = list(word[:-1]) + [word[-1] + END_OF_WORD]
  while len(parts) > 1:
    pairs = {(a, b) for a, b in zip(parts, parts[1:])}
    best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
    if best not in ranks:
      break
    merged, index = [], 0
    while index < len(parts):
      if index < len(parts) - 1 and (parts[index], parts[index + 1]) == best:
        merged.append(parts[index] + parts[index + 1])
        index += 2
      else:
        merged.append(parts[index])
        index += 1
    parts = merged
  return parts


def word_merges(words):
  """BPE merges (ranked list of pairs) that turn each word into a single token.

  A merge is appended only when a word's BPE under the merges so far still has several tokens;
  it joins that word's first two tokens. Appended merges rank last, so they never change the
  (single-token) result of an earlier word.
  """
  merges, ranks = [], {}
  for word in words:
    while len(parts := _clip_bpe(word, ranks)) > 1:
      pair = (parts[0], parts[1])
      ranks[pair] = len(merges)
      merges.append(pair)
  return merges


def tokenizer_files(words=None):
  """(vocab {token: id}, merges [(a, b)], bos_id, eos_id) of the world's tokenizer."""
  with open(os.path.join(tiny.TOKENIZER_DIR, "vocab.json")) as file:
    vocab = dict(json.load(file))
  merges = word_merges(words if words is not None else world.vocabulary())
  for first, second in merges:
    vocab.setdefault(first + second, len(vocab))
  return vocab, merges, vocab[tiny.BOS_TOKEN], vocab[tiny.EOS_TOKEN]


def write_tokenizer(directory, max_length):
  """Writes CLIPTokenizer files (vocab.json, merges.txt, configs) into `directory`.

  Returns:
    (vocab_size, bos_id, eos_id).
  """
  vocab, merges, bos_id, eos_id = tokenizer_files()
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.json"), "w") as file:
    json.dump(vocab, file, indent=0, sort_keys=True)
  with open(os.path.join(directory, "merges.txt"), "w") as file:
    file.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  special_tokens = {"bos_token": tiny.BOS_TOKEN, "eos_token": tiny.EOS_TOKEN,
                    "pad_token": tiny.EOS_TOKEN, "unk_token": tiny.EOS_TOKEN}
  tiny._write_json(os.path.join(directory, "special_tokens_map.json"), special_tokens)
  tiny._write_json(os.path.join(directory, "tokenizer_config.json"), dict(
      special_tokens, model_max_length=int(max_length), tokenizer_class="CLIPTokenizer",
      do_lower_case=True, errors="replace", add_prefix_space=False))
  return len(vocab), bos_id, eos_id


# ---------------------------------------------------------------------------------------------
# Modules and params.


def text_config(spec):
  """The `transformers.CLIPTextConfig` of the spec, with the tokenizer's vocab and ids."""
  vocab, _, bos_id, eos_id = tokenizer_files()
  config = transformers.CLIPTextConfig(
      **tiny._to_dict(spec["text_encoder"]), vocab_size=len(vocab), bos_token_id=bos_id,
      eos_token_id=eos_id, pad_token_id=eos_id)
  config.architectures = ["CLIPTextModel"]
  return config


def modules(spec):
  """{"unet", "vae", "text_encoder", "image_encoder"}: the Flax modules of the spec (float32)."""
  vision_config = tiny._to_dict(spec["image_encoder"])
  size = vision_config["image_size"]
  return {
      "unet": unet_lib.from_diffusers_config(tiny._to_dict(spec["unet"])),
      "vae": vae_lib.from_diffusers_config(tiny._to_dict(spec["vae"])),
      "text_encoder": pipeline_lib.text_encoder_module(text_config(spec)),
      "image_encoder": image_encoder_lib.ImageEncoder(
          config=vision_config, resize_size=size, crop_size=size),
  }


def _init_fn(name, module):
  if name == "text_encoder":
    return pipeline_lib.text_encoder_init_fn(module)
  return module.init_weights


def init_params(spec, seed):
  """{component: params} of freshly initialised models (`tiny._random_params`: fan-in scaled)."""
  root = jax.random.key(seed)
  return {name: tiny._random_params(_init_fn(name, module),
                                    jax.random.fold_in(root, _COMPONENT_STREAMS[name]))
          for name, module in modules(spec).items()}


def make_pipeline(spec, params, tokenizer_dir, scaling_factor):
  """An in-memory `pipeline.Pipeline` (what `load_pipeline` returns) from params.

  Args:
    spec: `shapes_model_spec()`.
    params: {"unet", "vae", "text_encoder", "image_encoder"} param trees.
    tokenizer_dir: a directory written by `write_tokenizer`.
    scaling_factor: the VAE latent scaling (UNet latents = scaling * VAE latents).
  """
  mods = modules(spec)
  return pipeline_lib.Pipeline(
      unet=mods["unet"], unet_params=params["unet"], vae=mods["vae"], vae_params=params["vae"],
      text_encoder=mods["text_encoder"], text_encoder_params=params["text_encoder"],
      tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
      scheduler_config=dict(spec["scheduler"]), image_encoder=mods["image_encoder"],
      image_encoder_params=params["image_encoder"], vae_scaling_factor=float(scaling_factor))


# ---------------------------------------------------------------------------------------------
# Export.


def _cast(params, fp16):
  dtype = np.float16 if fp16 else np.float32
  return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def export_pipeline(out_dir, spec, params, scaling_factor, fp16=True):
  """Writes a diffusers-format pipeline directory that `load_pipeline(out_dir)` reads.

  Args:
    out_dir: directory (created).
    spec: `shapes_model_spec()`.
    params: {"unet", "vae", "text_encoder", "image_encoder"} param trees.
    scaling_factor: written as the VAE config's `scaling_factor`.
    fp16: store weights as float16 msgpack (half the size; loaded back as float32).
  Returns:
    out_dir.
  """
  version = tiny.DIFFUSERS_LAYOUT_VERSION
  for name, torch_class in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
    config = tiny._to_dict(spec[name])
    if name == "vae":
      config["scaling_factor"] = float(scaling_factor)
    directory = os.path.join(out_dir, name)
    tiny._write_json(os.path.join(directory, "config.json"),
                     dict(config, _class_name=torch_class, _diffusers_version=version))
    convert.save_msgpack(_cast(params[name], fp16),
                         os.path.join(directory, pipeline_lib.DIFFUSERS_WEIGHTS[0]))
  vision_config = transformers.CLIPVisionConfig(**tiny._to_dict(spec["image_encoder"]))
  vision_config.architectures = ["CLIPVisionModelWithProjection"]
  for name, config in (("text_encoder", text_config(spec)), ("image_encoder", vision_config)):
    directory = os.path.join(out_dir, name)
    os.makedirs(directory, exist_ok=True)
    config.to_json_file(os.path.join(directory, "config.json"))
    convert.save_msgpack(_cast(params[name], fp16),
                         os.path.join(directory, pipeline_lib.TRANSFORMERS_WEIGHTS[0]))
  size = vision_config.image_size
  tiny.write_image_processor_config(os.path.join(out_dir, "image_encoder"), size)
  write_tokenizer(os.path.join(out_dir, "tokenizer"),
                  spec["text_encoder"]["max_position_embeddings"])
  tiny.write_scheduler_and_index(out_dir, spec["scheduler"], version)
  return out_dir


def param_count(params):
  """Number of scalars in a param tree."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def flat_names(params):
  """Sorted '/'-joined param paths (for checkpoint structure checks)."""
  return sorted("/".join(path) for path in flax.traverse_util.flatten_dict(params))
