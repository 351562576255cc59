"""The shapes-world model: tokenizer, export -> load_pipeline -> rollout, pre-training kernels."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from tdpo_jax import ddim
from tdpo_jax import rollout as rollout_lib
from tdpo_jax.configs import shapes as shapes_config
from tdpo_jax.models import pipeline as pipeline_lib
from tdpo_jax.shapes import model as model_lib
from tdpo_jax.shapes import pretrain
from tdpo_jax.shapes import world
from tests import helpers


def _tiny_spec():
  """configs/shapes.py's spec, shrunk for test speed (same component classes and layout)."""
  spec = shapes_config.shapes_model_spec()
  spec.vae.update(block_out_channels=(8, 8, 8), norm_num_groups=4)
  spec.unet.update(block_out_channels=(32, 32), cross_attention_dim=32, attention_head_dim=2,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
  spec.text_encoder.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2)
  return spec


def _small_pretrain_config(**overrides):
  config = shapes_config.pretrain_config()
  config.vae.update(steps=2, batch_size=4, scaling_images=8, warmup_steps=1)
  config.unet.update(warmup_steps=1, learning_rate=1e-3)
  config.update(log_every=1, checkpoint_every=1)
  config.update(overrides)
  return config


def test_world_words_are_single_tokens_and_bpe_matches_transformers(tmp_path):
  model_lib.write_tokenizer(str(tmp_path), 16)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  vocab, merges, bos_id, eos_id = model_lib.tokenizer_files()
  ranks = {pair: rank for rank, pair in enumerate(merges)}
  for word in world.vocabulary():
    ids = tokenizer(word).input_ids
    assert ids[0] == bos_id and ids[-1] == eos_id and len(ids) == 3, word
    assert tokenizer.convert_ids_to_tokens(ids[1]) == word + model_lib.END_OF_WORD
  for word in world.vocabulary() + ["squirrel", "reds", "toptop", "x"]:
    # transformers 5's CLIPTokenizer runs the `tokenizers` BPE model (4.x: a Python `.bpe`).
    bpe = [token.value for token in tokenizer.backend_tokenizer.model.tokenize(word)]
    assert model_lib._clip_bpe(word, ranks) == bpe, word
  longest = max(world.all_prompts(), key=lambda text: len(text.split()))
  ids = pipeline_lib.tokenize(tokenizer, [longest])
  assert ids.shape == (1, 16) and ids[0, len(longest.split()) + 1] == eos_id
  assert len(vocab) == max(vocab.values()) + 1


def test_export_loads_and_samples(tmp_path):
  spec = _tiny_spec()
  params = model_lib.init_params(spec, 0)
  out = model_lib.export_pipeline(str(tmp_path / "model"), spec, params, 0.5, fp16=True)
  loaded = pipeline_lib.load_pipeline(out)
  assert loaded.vae_scaling_factor == 0.5
  assert loaded.scheduler_config["beta_schedule"] == spec.scheduler.beta_schedule
  for name, tree in (("unet", loaded.unet_params), ("vae", loaded.vae_params),
                     ("text_encoder", loaded.text_encoder_params),
                     ("image_encoder", loaded.image_encoder_params)):
    expected = jax.tree.map(lambda x: np.asarray(x, np.float16).astype(np.float32), params[name])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, tree), expected)
  sample_config = types.SimpleNamespace(num_steps=2, eta=1.0, guidance_scale=5.0,
                                        height=world.IMAGE_SIZE, width=world.IMAGE_SIZE)
  rollout_fn = rollout_lib.make_rollout_fn(loaded, sample_config)
  input_ids, uncond_ids = rollout_lib.tokenize_prompts(loaded, ["two red circles", "a blue square"])
  trajectory = jax.jit(rollout_fn)(
      rollout_lib.RolloutParams(unet=loaded.unet_params, text_encoder=loaded.text_encoder_params,
                                vae=loaded.vae_params), input_ids, uncond_ids, jax.random.key(0))
  assert trajectory.images.shape == (2, world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
  assert trajectory.latents.shape == (2, 3, 4, 8, 8)
  assert np.all(np.isfinite(trajectory.log_probs))


def test_checkpoint_round_trip_is_atomic(tmp_path):
  path = str(tmp_path / "stage" / "checkpoint.msgpack")
  state = {"step": 7, "params": {"w": np.arange(6.0).reshape(2, 3)}, "scale": 0.25}
  pretrain.save_checkpoint(path, state)
  template = {"step": 0, "params": {"w": np.zeros((2, 3))}, "scale": 0.0}
  restored = pretrain.load_checkpoint(path, template)
  assert restored["step"] == 7 and restored["scale"] == 0.25
  np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
  assert os.listdir(tmp_path / "stage") == ["checkpoint.msgpack"]
  assert pretrain.load_checkpoint(str(tmp_path / "missing.msgpack"), template) is None


def test_vae_stage_resumes_exactly(tmp_path):
  spec = _tiny_spec()
  config = _small_pretrain_config()
  straight = str(tmp_path / "straight")
  resumed = str(tmp_path / "resumed")
  params_straight, scale_straight = pretrain.train_vae(straight, config, spec, 2, 4,
                                                       pretrain._Log(straight))
  pretrain.train_vae(resumed, config, spec, 1, 4, pretrain._Log(resumed))
  params_resumed, scale_resumed = pretrain.train_vae(resumed, config, spec, 2, 4,
                                                     pretrain._Log(resumed))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params_straight),
               jax.device_get(params_resumed))
  assert scale_straight == scale_resumed > 0
  assert os.path.isfile(os.path.join(straight, "samples", "vae_2.png"))


def test_unet_step_fits_a_fixed_batch(tmp_path):
  spec = _tiny_spec()
  config = _small_pretrain_config()
  params = model_lib.init_params(spec, 0)
  model_lib.write_tokenizer(str(tmp_path), spec.text_encoder.max_position_embeddings)
  pipeline = model_lib.make_pipeline(spec, params, str(tmp_path), 1.0)
  optimizer = pretrain._optimizer(config.unet)
  trainable = {"unet": params["unet"], "text_encoder": params["text_encoder"]}
  state = {"params": trainable, "opt_state": optimizer.init(trainable), "ema": trainable}
  step = jax.jit(pretrain.make_unet_step(pipeline, optimizer, ddim.alphas_cumprod(spec.scheduler),
                                         config.unet))
  mean = jax.random.normal(jax.random.key(1), (8, 4, 8, 8))
  posterior = (mean, jnp.full_like(mean, 0.01))
  ids = pipeline_lib.tokenize(pipeline.tokenizer, world.all_prompts()[:8])
  uncond = pipeline_lib.tokenize(pipeline.tokenizer, [""])
  losses = []
  for _ in range(8):  # the same rng: the same timesteps and noise, a fixed regression problem
    state, metrics = step(state, posterior, ids, uncond, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.9 * losses[0]
  # The EMA moved from the initial weights by (1 - decay) of each update, not the full update.
  leaf = lambda tree: np.asarray(jax.tree.leaves(tree["unet"])[0])  # noqa: E731
  assert 0 < np.abs(leaf(state["ema"]) - leaf(trainable)).max() < np.abs(
      leaf(state["params"]) - leaf(trainable)).max()


def test_command_line_errors_are_one_line(tmp_path):
  """The pre-training CLI (config flags, as `python -m tdpo_jax.main`) turns a bad override or
  flag into one line before touching the workdir; every stage declares its optimizer entries."""
  workdir = str(tmp_path / "w")
  for argv, message in (
      (["--config.unet.nope=1"], "unknown config key in --config.unet.nope"),
      (["--config.nope.steps=1"], "unknown config key in --config.nope.steps"),
      (["--config.unet.dataset_size=abc"], "--config.unet.dataset_size=abc: invalid literal"),
      (["--set", "unet.dataset_size=1"], "Unknown command line flag 'set'"),
      (["--steps=-1"], "--steps=-1"),
      (["--stage=both"], "--stage"),
      ([f"--config={helpers.REPO}/configs/shapes_pretrain.py:x"], "takes no argument")):
    with pytest.raises(SystemExit, match=message) as error:
      pretrain.main([f"--workdir={workdir}"] + argv)
    assert str(error.value).startswith("error: ") and "\n" not in str(error.value)
  assert not (tmp_path / "w").exists()
  values, _ = pretrain.cli.parse([f"--workdir={workdir}", "--config.unet.dataset_size=128",
                                  "--config.vae.grad_clip=0.5"], pretrain.define_flags)
  config = values["config"].value
  assert config.unet.dataset_size == 128 and config.vae.grad_clip == 0.5
  for stage in (config.vae, config.unet):
    assert {"grad_clip", "weight_decay"} <= set(stage.keys())
