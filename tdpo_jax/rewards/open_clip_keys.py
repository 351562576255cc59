"""open_clip CLIP state dicts (HPSv2's ViT-H/14) <-> transformers `CLIPModel` key names, in NumPy.

Shape legend: W a tower's width (hidden_size), E the projection width, F the MLP width, P the
patch size, N the number of positions (patches + 1 for the vision tower, 77 for text), V the
vocabulary size.

open_clip (`open_clip.model.CLIP` with a `VisionTransformer` and a text `Transformer`, built
from `nn.MultiheadAttention` blocks) and transformers' CLIP compute the same functions:

| open_clip                              | transformers CLIPModel                             |
|----------------------------------------|----------------------------------------------------|
| visual.conv1.weight (W,3,P,P)          | vision_model.embeddings.patch_embedding.weight     |
| visual.class_embedding (W,)            | vision_model.embeddings.class_embedding            |
| visual.positional_embedding (N,W)      | vision_model.embeddings.position_embedding.weight  |
| visual.ln_pre.*                        | vision_model.pre_layrnorm.*                        |
| visual.transformer.resblocks.i.*       | vision_model.encoder.layers.i.*                    |
| visual.ln_post.*                       | vision_model.post_layernorm.*                      |
| visual.proj (W,E), used as x @ proj    | visual_projection.weight (E,W) = proj.T            |
| token_embedding.weight (V,W)           | text_model.embeddings.token_embedding.weight       |
| positional_embedding (N,W)             | text_model.embeddings.position_embedding.weight    |
| transformer.resblocks.i.*              | text_model.encoder.layers.i.*                      |
| ln_final.*                             | text_model.final_layer_norm.*                      |
| text_projection (W,E), used as x @ P   | text_projection.weight (E,W) = P.T                 |
| logit_scale ()                         | logit_scale ()                                     |

and in each residual block (`x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`):

| open_clip block                        | transformers layer                                 |
|----------------------------------------|----------------------------------------------------|
| attn.in_proj_weight (3W,W) = [Wq;Wk;Wv] | self_attn.{q,k,v}_proj.weight (W,W) each          |
| attn.in_proj_bias (3W,) = [bq;bk;bv]   | self_attn.{q,k,v}_proj.bias (W,) each              |
| attn.out_proj.*                        | self_attn.out_proj.*                               |
| ln_1.*, ln_2.*                         | layer_norm1.*, layer_norm2.*                       |
| mlp.c_fc.* (F,W), mlp.c_proj.* (W,F)   | mlp.fc1.*, mlp.fc2.*                               |

Preconditions (not visible in the keys; the CLIPConfig must say them): the activation
(`hidden_act="gelu"` for ViT-H/14 — open_clip's QuickGELU models need "quick_gelu"), LayerNorm
eps 1e-5, no layer scale (`ls_1`/`ls_2`), no attention pooling, causal text mask; open_clip pools
the text at `argmax(ids)`, transformers at the first `eos_token_id` (the same token for CLIP's
vocabulary). Buffers such as `attn_mask` are not part of the mapping.
"""
import numpy as np

SAME, TRANSPOSE, SPLIT_QKV = "same", "transpose", "split_qkv"


def _block_rows(open_clip_prefix, transformers_prefix):
  """(open_clip key, transformers keys, kind) rows of one residual block."""
  attention = f"{transformers_prefix}.self_attn"
  rows = [
      (f"{open_clip_prefix}.attn.in_proj_weight",
       tuple(f"{attention}.{name}_proj.weight" for name in "qkv"), SPLIT_QKV),
      (f"{open_clip_prefix}.attn.in_proj_bias",
       tuple(f"{attention}.{name}_proj.bias" for name in "qkv"), SPLIT_QKV),
  ]
  for open_clip_name, transformers_name in (("attn.out_proj", "self_attn.out_proj"),
                                            ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                                            ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2")):
    for leaf in ("weight", "bias"):
      rows.append((f"{open_clip_prefix}.{open_clip_name}.{leaf}",
                   (f"{transformers_prefix}.{transformers_name}.{leaf}",), SAME))
  return rows


def _norm_rows(open_clip_name, transformers_name):
  return [(f"{open_clip_name}.{leaf}", (f"{transformers_name}.{leaf}",), SAME)
          for leaf in ("weight", "bias")]


def key_table(config):
  """The mapping as ordered rows (open_clip key, transformers keys, kind).

  Args:
    config: `transformers.CLIPConfig` (only the numbers of layers are read).
  Returns:
    list of (str, tuple of str, kind) with kind in {SAME, TRANSPOSE, SPLIT_QKV}.
  """
  rows = [
      ("visual.class_embedding", ("vision_model.embeddings.class_embedding",), SAME),
      ("visual.positional_embedding", ("vision_model.embeddings.position_embedding.weight",),
       SAME),
      ("visual.conv1.weight", ("vision_model.embeddings.patch_embedding.weight",), SAME),
  ]
  rows += _norm_rows("visual.ln_pre", "vision_model.pre_layrnorm")
  for index in range(config.vision_config.num_hidden_layers):
    rows += _block_rows(f"visual.transformer.resblocks.{index}",
                        f"vision_model.encoder.layers.{index}")
  rows += _norm_rows("visual.ln_post", "vision_model.post_layernorm")
  rows.append(("visual.proj", ("visual_projection.weight",), TRANSPOSE))
  rows += [
      ("token_embedding.weight", ("text_model.embeddings.token_embedding.weight",), SAME),
      ("positional_embedding", ("text_model.embeddings.position_embedding.weight",), SAME),
  ]
  for index in range(config.text_config.num_hidden_layers):
    rows += _block_rows(f"transformer.resblocks.{index}", f"text_model.encoder.layers.{index}")
  rows += _norm_rows("ln_final", "text_model.final_layer_norm")
  rows.append(("text_projection", ("text_projection.weight",), TRANSPOSE))
  rows.append(("logit_scale", ("logit_scale",), SAME))
  return rows


def expected_open_clip_shapes(config):
  """Ordered {open_clip key: shape} that `config`'s model needs (checked before converting)."""
  vision, text = config.vision_config, config.text_config
  width_v, width_t, embed = vision.hidden_size, text.hidden_size, config.projection_dim
  positions_v = (vision.image_size // vision.patch_size) ** 2 + 1
  patch = vision.patch_size

  def block_shapes(prefix, width, mlp_width):
    return {f"{prefix}.attn.in_proj_weight": (3 * width, width),
            f"{prefix}.attn.in_proj_bias": (3 * width,),
            f"{prefix}.attn.out_proj.weight": (width, width),
            f"{prefix}.attn.out_proj.bias": (width,),
            f"{prefix}.ln_1.weight": (width,), f"{prefix}.ln_1.bias": (width,),
            f"{prefix}.mlp.c_fc.weight": (mlp_width, width),
            f"{prefix}.mlp.c_fc.bias": (mlp_width,),
            f"{prefix}.mlp.c_proj.weight": (width, mlp_width),
            f"{prefix}.mlp.c_proj.bias": (width,),
            f"{prefix}.ln_2.weight": (width,), f"{prefix}.ln_2.bias": (width,)}

  shapes = {"visual.class_embedding": (width_v,),
            "visual.positional_embedding": (positions_v, width_v),
            "visual.conv1.weight": (width_v, vision.num_channels, patch, patch),
            "visual.ln_pre.weight": (width_v,), "visual.ln_pre.bias": (width_v,)}
  for index in range(vision.num_hidden_layers):
    shapes.update(block_shapes(f"visual.transformer.resblocks.{index}", width_v,
                               vision.intermediate_size))
  shapes.update({"visual.ln_post.weight": (width_v,), "visual.ln_post.bias": (width_v,),
                 "visual.proj": (width_v, embed),
                 "token_embedding.weight": (text.vocab_size, width_t),
                 "positional_embedding": (text.max_position_embeddings, width_t)})
  for index in range(text.num_hidden_layers):
    shapes.update(block_shapes(f"transformer.resblocks.{index}", width_t, text.intermediate_size))
  shapes.update({"ln_final.weight": (width_t,), "ln_final.bias": (width_t,),
                 "text_projection": (width_t, embed), "logit_scale": ()})
  order = [row[0] for row in key_table(config)]
  assert order == list(shapes), "key_table and expected_open_clip_shapes disagree"
  return shapes


def open_clip_to_transformers(state_dict, config):
  """open_clip state dict -> transformers CLIPModel state dict (NumPy; keys not in the table,
  e.g. buffers, are dropped). Validate shapes first (`expected_open_clip_shapes`)."""
  result = {}
  for open_clip_key, transformers_keys, kind in key_table(config):
    value = np.asarray(state_dict[open_clip_key])
    if kind == SPLIT_QKV:
      for key, part in zip(transformers_keys, np.split(value, 3, axis=0)):
        result[key] = part
    elif kind == TRANSPOSE:
      result[transformers_keys[0]] = value.T
    else:
      result[transformers_keys[0]] = value
  return result


def transformers_to_open_clip(state_dict, config):
  """transformers CLIPModel state dict -> open_clip key names and layouts (the inverse map; used
  to build open_clip-format test checkpoints from a transformers model)."""
  result = {}
  for open_clip_key, transformers_keys, kind in key_table(config):
    values = [np.asarray(state_dict[key]) for key in transformers_keys]
    if kind == SPLIT_QKV:
      result[open_clip_key] = np.concatenate(values, axis=0)
    elif kind == TRANSPOSE:
      result[open_clip_key] = np.ascontiguousarray(values[0].T)
    else:
      result[open_clip_key] = values[0]
  return result
