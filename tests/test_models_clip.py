"""Tests for tdpo_jax.models.clip: parity with transformers' PyTorch CLIP, param-tree identity with
transformers' Flax CLIP (golden files), the shipped shapes-world towers, real sizes, bf16, remat.

Shape legend: B batch (2), L tokens (12 of 16 positions), D width (32), d projection (24), S image
side (24, patch 6, N = 16 patches), pixel_values (B, 3, S, S) NCHW. Tiny configs come from the
golden JSON files written by tests/golden/make_clip_golden.py (transformers 4.x's Flax classes);
nothing here needs those classes. PyTorch (a test extra) is needed only by the parity tests and
the PyTorch parameter counts, which are skipped without it.
"""
import dataclasses
import json
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdpo_jax.models import clip
from tdpo_jax.models import convert
from tdpo_jax.rewards import open_clip_keys
from tests import helpers

GOLDEN_DIR = os.path.join(helpers.REPO, "tests", "golden")
SHIPPED_DIR = os.path.join(helpers.REPO, "tdpo_jax", "shapes", "assets", "pipeline")
golden = helpers.load_script(os.path.join("tests", "golden", "make_clip_golden.py"),
                             "make_clip_golden")

# float32 parity: max |ours - reference| / max |reference| (measured 1.7e-7 … 2e-6 on one machine,
# up to 1.02e-5 on another of the same kind: XLA's CPU code differs with the CPU; the largest is
# CLIP's logits, exp(logit_scale) = 14.3 times a cosine).
FLOAT32_TOLERANCE = 5e-5
# bfloat16 compute against our float32 outputs, same measure (measured 2.5e-3 … 6.5e-3: bf16 has
# an 8-bit mantissa, relative rounding 2^-9 = 2e-3 per op, a few ops deep).
BFLOAT16_TOLERANCE = 3e-2
# LayerNorm / bias perturbation of the PyTorch reference (its init has LN = (1, 0), zero biases).
PERTURB_SCALE_STD, PERTURB_BIAS_STD = 0.2, 0.1
TEXT_LENGTH = 12  # < max_position_embeddings (16): position ids 0 … 11 of a shorter input
REAL_EOS_ID = 97  # TINY_TEXT's eos_token_id; not the largest id (98), so the two rules differ
LARGEST_ID = 98
# Rows where the first REAL_EOS_ID (positions 4, 5), the largest id (2, 7) and the first
# LEGACY_EOS_TOKEN_ID (5, 1) sit at different positions; row 1 is padded with 0 after 7.
TEXT_IDS = np.array([
    [96, 5, LARGEST_ID, 40, REAL_EOS_ID, 2, REAL_EOS_ID, REAL_EOS_ID, REAL_EOS_ID, REAL_EOS_ID,
     REAL_EOS_ID, REAL_EOS_ID],
    [96, 2, 10, 20, 30, REAL_EOS_ID, 44, LARGEST_ID, 0, 0, 0, 0]], np.int32)
TEXT_MASK = np.array([[1] * TEXT_LENGTH, [1] * 8 + [0] * 4], np.int32)

# Real sizes: jax.eval_shape of our modules; `test_real_param_counts` checks each against
# transformers' PyTorch classes (meta device) and, for ViT-H/14, open_clip's key table. They also
# agree with open_clip's docs/model_profile.csv (M params: ViT-L-14 image 303.97; ViT-H-14 image
# 632.08, text 354.03, total 986.11).
SD15_TEXT_PARAMS = 123_060_480  # CLIP ViT-L/14 text (SD 1.5's text encoder), no projection
VIT_L_14_VISION_PROJ_PARAMS = 303_966_208  # CLIP ViT-L/14 vision + 1024x768 projection
VIT_H_14_VISION_PROJ_PARAMS = 632_076_800  # open_clip ViT-H/14 `visual` (proj 1280x1024)
VIT_H_14_CLIP_PARAMS = 986_109_441  # open_clip ViT-H/14 whole CLIP (+ text tower, logit_scale)


def _read_golden(name):
  with open(os.path.join(GOLDEN_DIR, name)) as file:
    return json.load(file)


TEXT_GOLDEN = _read_golden("clip_text_tiny_tree.json")
VISION_GOLDEN = _read_golden("clip_vision_tiny_tree.json")
MODEL_GOLDEN = _read_golden("clip_model_tiny_tree.json")


def _errors(actual, reference):
  """(max |actual - reference|, that / max |reference|)."""
  actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
  assert actual.shape == reference.shape, (actual.shape, reference.shape)
  max_abs = float(np.abs(actual - reference).max())
  return max_abs, max_abs / float(np.abs(reference).max())


def _assert_close(actual, reference, tolerance, what):
  max_abs, max_rel = _errors(actual, reference)
  print(f"PARITY {what}: max abs {max_abs:.2e}, max rel {max_rel:.2e}")
  assert max_rel <= tolerance, f"{what}: max rel error {max_rel:.2e} > {tolerance:.0e}"


def _shapes(init_fn):
  """{flax_path: ShapeDtypeStruct} of `init_fn(rng)`."""
  return convert.expected_param_shapes(init_fn, jax.random.key(0))


def _init_fn(module):
  """rng -> random params of one of clip's modules."""
  if isinstance(module, clip.ClipModel):
    return lambda rng: clip.init_clip_params(module, rng)
  if isinstance(module, (clip.ClipTextModel, clip.ClipTextModelWithProjection)):
    return lambda rng: clip.init_text_params(module, rng)
  return lambda rng: clip.init_vision_params(module, rng)


def _num_params(module):
  return sum(int(np.prod(struct.shape)) for struct in _shapes(_init_fn(module)).values())


def _pixel_values(config, seed=0, batch=2):
  size = config["image_size"]
  return np.random.default_rng(seed).normal(
      size=(batch, config["num_channels"], size, size)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Configs and small pure functions.


def test_config_readers_accept_transformers_dicts_and_dataclasses():
  transformers = pytest.importorskip("transformers")
  from_dict = clip.text_config(TEXT_GOLDEN["config"])
  from_transformers = clip.text_config(transformers.CLIPTextConfig(**TEXT_GOLDEN["config"]))
  assert from_dict == from_transformers == clip.text_config(from_dict)
  assert dataclasses.asdict(from_dict) == TEXT_GOLDEN["config"]
  vision = clip.vision_config({**VISION_GOLDEN["config"], "architectures": ["ignored"]})
  assert dataclasses.asdict(vision) == VISION_GOLDEN["config"] and vision.num_patches == 16
  # A CLIPConfig: the top-level projection_dim, not the sub-configs' default 512.
  config = transformers.CLIPConfig(text_config=TEXT_GOLDEN["config"],
                                   vision_config=VISION_GOLDEN["config"], projection_dim=20)
  assert clip.clip_config(config) == clip.clip_config(MODEL_GOLDEN["config"])
  assert clip.clip_config(config).projection_dim == 20


@pytest.mark.parametrize("overrides, message", [
    (dict(num_attention_heads=5), "not divisible by num_attention_heads=5"),
    (dict(hidden_act="relu"), "hidden_act 'relu'"),
])
def test_bad_configs_are_named(overrides, message):
  with pytest.raises(ValueError, match=message):
    clip.text_config({**TEXT_GOLDEN["config"], **overrides})


def test_eot_positions_follow_transformers_rules():
  np.testing.assert_array_equal(clip.eot_positions(jnp.asarray(TEXT_IDS), REAL_EOS_ID), [4, 5])
  np.testing.assert_array_equal(
      clip.eot_positions(jnp.asarray(TEXT_IDS), clip.LEGACY_EOS_TOKEN_ID), [2, 7])  # argmax
  no_eos = jnp.asarray([[5, 6, 7]])
  np.testing.assert_array_equal(clip.eot_positions(no_eos, REAL_EOS_ID), [0])


def test_activations_by_hand():
  x = jnp.asarray([-1.0, 0.0, 2.0])
  np.testing.assert_allclose(clip.quick_gelu(x), x / (1 + np.exp(-1.702 * np.asarray(x))),
                             rtol=1e-6)
  np.testing.assert_allclose(clip.exact_gelu(x), [-0.15865525, 0.0, 1.9544997], rtol=1e-6)


def test_nhwc_pixel_values_are_rejected():
  module = clip.ClipVisionModelWithProjection(VISION_GOLDEN["config"])
  size = VISION_GOLDEN["config"]["image_size"]
  with pytest.raises(ValueError, match="NCHW"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))


def test_too_long_input_ids_are_rejected():
  module = clip.ClipTextModel(TEXT_GOLDEN["config"])
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 17), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Param trees: identical to transformers' Flax classes (golden files), float32, remat-invariant.


GOLDEN_TREES = [
    (TEXT_GOLDEN, "FlaxCLIPTextModule", clip.ClipTextModel),
    (TEXT_GOLDEN, "FlaxCLIPTextModelWithProjectionModule", clip.ClipTextModelWithProjection),
    (VISION_GOLDEN, "ImageEncoder", clip.ClipVisionModelWithProjection),
    (VISION_GOLDEN, "FlaxCLIPVisionModule", clip.ClipVisionModel),
    (MODEL_GOLDEN, "FlaxCLIPModule", clip.ClipModel),
]


@pytest.mark.parametrize("golden_file, reference_name, module_class", GOLDEN_TREES,
                         ids=[entry[1] for entry in GOLDEN_TREES])
@pytest.mark.parametrize("dtype, remat", [(jnp.float32, False), (jnp.bfloat16, True)],
                         ids=["float32", "bfloat16-remat"])
def test_param_tree_matches_transformers_flax(golden_file, reference_name, module_class, dtype,
                                              remat):
  module = module_class(golden_file["config"], dtype=dtype, remat=remat)
  shapes = jax.eval_shape(_init_fn(module), jax.random.key(0))
  assert golden.tree_lines(shapes) == golden_file["trees"][reference_name]
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------------
# Parity with transformers' PyTorch CLIP (float32, CPU).


def _perturbed_torch_model(model_class, config, seed):
  """A transformers PyTorch CLIP model in eval mode, random init + perturbed LNs and biases."""
  torch = pytest.importorskip("torch")
  torch.manual_seed(seed)
  config._attn_implementation = "eager"  # pylint: disable=protected-access  (plain softmax)
  model = model_class(config).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.add_(PERTURB_SCALE_STD * torch.randn_like(module.weight))
      if getattr(module, "bias", None) is not None:
        module.bias.add_(PERTURB_BIAS_STD * torch.randn_like(module.bias))
  return model


def _state_dict(model):
  """PyTorch model -> {key: np.ndarray} as `safetensors.numpy.load_file` would return it."""
  return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def _flax_params(module, model):
  return convert.clip_pytorch_to_flax(_state_dict(model), _shapes(_init_fn(module)), "torch")


TEXT_CASES = {
    # id: (config overrides, with projection, attention mask)
    "quick_gelu-eos97-noproj-mask": (dict(hidden_act="quick_gelu"), False, True),
    "gelu-legacy_eos2-proj": (dict(hidden_act="gelu", eos_token_id=2), True, False),
    "quick_gelu-eos97-proj": (dict(hidden_act="quick_gelu"), True, False),
    "gelu-eos97-noproj": (dict(hidden_act="gelu"), False, False),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_text_parity_with_pytorch(case):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  overrides, with_projection, use_mask = TEXT_CASES[case]
  values = {**TEXT_GOLDEN["config"], **overrides}
  model_class = (transformers.CLIPTextModelWithProjection if with_projection
                 else transformers.CLIPTextModel)
  model = _perturbed_torch_model(model_class, transformers.CLIPTextConfig(**values), seed=1)
  module = (clip.ClipTextModelWithProjection if with_projection else clip.ClipTextModel)(values)
  params = _flax_params(module, model)
  mask = TEXT_MASK if use_mask else None
  with torch.no_grad():
    torch_ids = torch.tensor(TEXT_IDS, dtype=torch.long)
    torch_mask = None if mask is None else torch.tensor(mask)
    # transformers 5's CLIPTextModel is the transformer itself (4.x wrapped it as .text_model).
    tower = getattr(model, "text_model", model)
    reference = tower(input_ids=torch_ids, attention_mask=torch_mask)
    text_embeds = model(input_ids=torch_ids, attention_mask=torch_mask).text_embeds \
        if with_projection else None
  outputs = jax.jit(module.apply)({"params": params}, jnp.asarray(TEXT_IDS),
                                  None if mask is None else jnp.asarray(mask))
  _assert_close(outputs.last_hidden_state, reference.last_hidden_state, FLOAT32_TOLERANCE,
                f"text {case} last_hidden_state")
  _assert_close(outputs.pooler_output, reference.pooler_output, FLOAT32_TOLERANCE,
                f"text {case} pooler_output")
  if with_projection:
    _assert_close(outputs.text_embeds, text_embeds, FLOAT32_TOLERANCE, f"text {case} text_embeds")


VISION_CASES = {"quick_gelu-proj": "quick_gelu", "gelu-proj (open_clip ViT-H style)": "gelu"}


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_vision_parity_with_pytorch(case):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  values = {**VISION_GOLDEN["config"], "hidden_act": VISION_CASES[case]}
  model = _perturbed_torch_model(transformers.CLIPVisionModelWithProjection,
                                 transformers.CLIPVisionConfig(**values), seed=2)
  module = clip.ClipVisionModelWithProjection(values)
  params = _flax_params(module, model)
  pixel_values = _pixel_values(values)
  with torch.no_grad():
    reference = model(pixel_values=torch.tensor(pixel_values))
    pooled = model.vision_model(pixel_values=torch.tensor(pixel_values)).pooler_output
  outputs = jax.jit(module.apply)({"params": params}, jnp.asarray(pixel_values))
  _assert_close(outputs.last_hidden_state, reference.last_hidden_state, FLOAT32_TOLERANCE,
                f"vision {case} last_hidden_state")
  _assert_close(outputs.pooler_output, pooled, FLOAT32_TOLERANCE, f"vision {case} pooler_output")
  _assert_close(outputs.image_embeds, reference.image_embeds, FLOAT32_TOLERANCE,
                f"vision {case} image_embeds")


# open_clip ViT-H/14's choices (exact GELU in both towers, pooling at argmax(ids)), tiny sizes.
OPEN_CLIP_STYLE = {"text_config": dict(hidden_act="gelu", eos_token_id=clip.LEGACY_EOS_TOKEN_ID),
                   "vision_config": dict(hidden_act="gelu")}


@pytest.mark.parametrize("key_format", ["transformers", "open_clip"])
def test_dual_encoder_parity_with_pytorch(key_format):
  """`ClipModel` (rewards' dual encoder) against PyTorch `CLIPModel`; "open_clip": the weights go
  through open_clip's key names and back (`rewards.open_clip_keys`, HPSv2's loading path)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  values = dict(MODEL_GOLDEN["config"])
  if key_format == "open_clip":
    for tower, overrides in OPEN_CLIP_STYLE.items():
      values[tower] = {**values[tower], **overrides}
  model = _perturbed_torch_model(transformers.CLIPModel, transformers.CLIPConfig(**values), 3)
  module = clip.ClipModel(values)
  state_dict = _state_dict(model)
  if key_format == "open_clip":
    config = clip.clip_config(values)
    open_clip_state_dict = open_clip_keys.transformers_to_open_clip(state_dict, config)
    assert {key: value.shape for key, value in open_clip_state_dict.items()} == \
        open_clip_keys.expected_open_clip_shapes(config)
    state_dict = open_clip_keys.open_clip_to_transformers(open_clip_state_dict, config)
  params = convert.clip_pytorch_to_flax(state_dict, _shapes(_init_fn(module)), key_format)
  pixel_values = _pixel_values(values["vision_config"])
  with torch.no_grad():
    torch_ids = torch.tensor(TEXT_IDS, dtype=torch.long)
    reference = model(input_ids=torch_ids, pixel_values=torch.tensor(pixel_values))
    # transformers 5 returns an output whose pooler_output is the projection (4.x: the tensor).
    text_features = model.get_text_features(input_ids=torch_ids)
    text_features = getattr(text_features, "pooler_output", text_features)
    image_features = model.get_image_features(pixel_values=torch.tensor(pixel_values))
    image_features = getattr(image_features, "pooler_output", image_features)
  apply = jax.jit(module.apply, static_argnames="method")
  outputs = apply({"params": params}, jnp.asarray(TEXT_IDS), jnp.asarray(pixel_values))
  for name in ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds"):
    _assert_close(getattr(outputs, name), getattr(reference, name), FLOAT32_TOLERANCE,
                  f"ClipModel {key_format} {name}")
  _assert_close(apply({"params": params}, jnp.asarray(TEXT_IDS),
                      method=clip.ClipModel.get_text_features), text_features,
                FLOAT32_TOLERANCE, f"ClipModel {key_format} get_text_features")
  _assert_close(apply({"params": params}, jnp.asarray(pixel_values),
                      method=clip.ClipModel.get_image_features), image_features,
                FLOAT32_TOLERANCE, f"ClipModel {key_format} get_image_features")


# ---------------------------------------------------------------------------------------------
# The shipped shapes-world towers: same outputs as transformers' Flax classes gave (golden).


def _load_shipped(name, module):
  """(config dict, params) of a shipped tower, loaded into `module_class(config)`."""
  directory = os.path.join(SHIPPED_DIR, name)
  params = convert.check_params(
      convert.load_msgpack(os.path.join(directory, "flax_model.msgpack")),
      _shapes(_init_fn(module)), name)
  return jax.tree.map(jnp.asarray, params)


def _shipped_config(name):
  with open(os.path.join(SHIPPED_DIR, name, "config.json")) as file:
    return json.load(file)


def test_shipped_towers_match_golden_outputs():
  expected = np.load(os.path.join(GOLDEN_DIR, "clip_shipped_outputs.npz"))
  text_module = clip.ClipTextModel(_shipped_config("text_encoder"))
  vision_values = _shipped_config("image_encoder")
  vision_module = clip.ClipVisionModelWithProjection(vision_values)
  input_ids, pixel_values = golden.golden_inputs(vision_values["image_size"],
                                                 vision_values["num_channels"])
  text = jax.jit(text_module.apply)({"params": _load_shipped("text_encoder", text_module)},
                                    jnp.asarray(input_ids), jnp.ones_like(input_ids))
  vision = jax.jit(vision_module.apply)(
      {"params": _load_shipped("image_encoder", vision_module)}, jnp.asarray(pixel_values))
  tokens = golden.SHIPPED_VISION_TOKENS
  for name, actual in (("text_last_hidden_state", text.last_hidden_state),
                       ("text_pooler_output", text.pooler_output),
                       ("vision_last_hidden_state", vision.last_hidden_state[:, :tokens]),
                       ("vision_pooler_output", vision.pooler_output),
                       ("image_embeds", vision.image_embeds)):
    _assert_close(actual, expected[name], FLOAT32_TOLERANCE, f"shipped {name}")


# ---------------------------------------------------------------------------------------------
# Real sizes.


def _torch_num_params(model_class, config):
  """Parameter count of a transformers PyTorch model built on the meta device (no memory)."""
  torch = pytest.importorskip("torch")
  with torch.device("meta"):
    model = model_class(config)
  return sum(parameter.numel() for parameter in model.parameters())


def test_real_param_counts():
  transformers = pytest.importorskip("transformers")
  text = clip.ClipTextModel(clip.CLIP_VIT_L_14_TEXT)
  vision_l = clip.ClipVisionModelWithProjection(clip.CLIP_VIT_L_14_VISION)
  vision_h = clip.ClipVisionModelWithProjection(clip.OPEN_CLIP_VIT_H_14_VISION)
  model_h = clip.ClipModel(clip.OPEN_CLIP_VIT_H_14)
  counts = {name: _num_params(module) for name, module in (
      ("sd15_text", text), ("vit_l_14_vision", vision_l), ("vit_h_14_vision", vision_h),
      ("vit_h_14_clip", model_h))}
  print("PARAMS", counts)
  assert counts == {"sd15_text": SD15_TEXT_PARAMS,
                    "vit_l_14_vision": VIT_L_14_VISION_PROJ_PARAMS,
                    "vit_h_14_vision": VIT_H_14_VISION_PROJ_PARAMS,
                    "vit_h_14_clip": VIT_H_14_CLIP_PARAMS}
  # open_clip's own key table (rewards.open_clip_keys): the `visual.*` tensors and all of them.
  open_clip_shapes = open_clip_keys.expected_open_clip_shapes(clip.OPEN_CLIP_VIT_H_14)
  sizes = {key: int(np.prod(shape)) for key, shape in open_clip_shapes.items()}
  assert sum(size for key, size in sizes.items() if key.startswith("visual.")) == \
      VIT_H_14_VISION_PROJ_PARAMS
  assert sum(sizes.values()) == VIT_H_14_CLIP_PARAMS
  # transformers' PyTorch classes built from the same configs.
  assert _torch_num_params(transformers.CLIPTextModel, transformers.CLIPTextConfig(
      **dataclasses.asdict(clip.CLIP_VIT_L_14_TEXT))) == SD15_TEXT_PARAMS
  for config, count in ((clip.CLIP_VIT_L_14_VISION, VIT_L_14_VISION_PROJ_PARAMS),
                        (clip.OPEN_CLIP_VIT_H_14_VISION, VIT_H_14_VISION_PROJ_PARAMS)):
    assert _torch_num_params(transformers.CLIPVisionModelWithProjection,
                             transformers.CLIPVisionConfig(**dataclasses.asdict(config))) == count


# ---------------------------------------------------------------------------------------------
# Precision and remat.


def _random_params(module, seed):
  """Random params (our init; LN scales and biases perturbed like the PyTorch references)."""
  params = jax.jit(_init_fn(module))(jax.random.key(seed))
  flat = flax.traverse_util.flatten_dict(params)
  noise = np.random.default_rng(seed)
  for path, value in flat.items():
    if path[-1] == "scale":
      flat[path] = value + PERTURB_SCALE_STD * noise.normal(size=value.shape).astype(np.float32)
    elif path[-1] == "bias":
      flat[path] = value + PERTURB_BIAS_STD * noise.normal(size=value.shape).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _tiny_modules(dtype=jnp.float32, remat=False):
  """(text module, its inputs), (vision module, its inputs) of the tiny golden configs."""
  text = clip.ClipTextModelWithProjection(TEXT_GOLDEN["config"], dtype=dtype, remat=remat)
  vision = clip.ClipVisionModelWithProjection(VISION_GOLDEN["config"], dtype=dtype, remat=remat)
  return ((text, (jnp.asarray(TEXT_IDS),)),
          (vision, (jnp.asarray(_pixel_values(VISION_GOLDEN["config"])),)))


def test_bfloat16_compute_stays_close_to_float32():
  for (module, inputs), (module_bf16, _) in zip(_tiny_modules(), _tiny_modules(jnp.bfloat16)):
    params = _random_params(module, seed=4)
    reference = jax.jit(module.apply)({"params": params}, *inputs)
    outputs = jax.jit(module_bf16.apply)({"params": params}, *inputs)
    for name, value in outputs._asdict().items():
      assert value.dtype == jnp.bfloat16, name
      _assert_close(value, getattr(reference, name), BFLOAT16_TOLERANCE,
                    f"bf16 {type(module).__name__} {name}")


def test_remat_gives_identical_outputs_and_gradients():
  for (module, inputs), (module_remat, _) in zip(_tiny_modules(), _tiny_modules(remat=True)):
    params = _random_params(module, seed=5)

    def loss_fn(params, module=module):
      return jnp.sum(module.apply({"params": params}, *inputs)[0] ** 2)

    def loss_remat_fn(params, module=module_remat):
      return jnp.sum(module.apply({"params": params}, *inputs)[0] ** 2)

    # The switch is effective: one rematerialised call (jaxpr primitive `remat2`) per layer.
    layers = module.config["num_hidden_layers"]
    assert str(jax.make_jaxpr(loss_remat_fn)(params)).count("remat") == layers
    assert "remat" not in str(jax.make_jaxpr(loss_fn)(params))
    np.testing.assert_array_equal(jax.jit(module.apply)({"params": params}, *inputs)[0],
                                  jax.jit(module_remat.apply)({"params": params}, *inputs)[0])
    grads = jax.jit(jax.grad(loss_fn))(params)
    grads_remat = jax.jit(jax.grad(loss_remat_fn))(params)
    assert jax.tree.structure(grads) == jax.tree.structure(grads_remat)
    for grad, grad_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
      np.testing.assert_allclose(grad_remat, grad, rtol=1e-5, atol=1e-7)
