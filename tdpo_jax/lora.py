"""LoRA as a pytree transform over a Flax parameter tree (any module; here the diffusers UNet).

Shape legend:
  n_in, n_out  a Dense kernel's input / output width; Flax kernels are (n_in, n_out)
  r            LoRA rank

A kernel W (n_in, n_out) whose "/"-joined path matches one of the target regexes gets an
adapter {a: (n_in, r), b: (r, n_out)}, and the merged kernel is

  W' = W + (alpha / r) A B.

`a` ~ N(0, std^2) with std = 1/r (diffusers' `LoRALinearLayer`, which the official DDPO/TDPO
code uses) and `b` = 0, so W' = W at init. The adapters live in a nested dict mirroring the
base tree down to the kernel, e.g.
`{"down_blocks_0": {"attentions_0": {... {"to_q": {"kernel": {"a": ..., "b": ...}}}}}}`,
so path-regex rules (sharding, masks) and orbax checkpoints treat it like any param tree.
A path is adapted when any regex matches it (`re.search`; anchor with `^`/`$`), e.g. the
default `.*attn[12]/to_(q|k|v|out_0)/kernel$` for the UNet's attention projections.
"""
import re
from typing import Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

PATH_SEPARATOR = "/"


def _path_string(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator=PATH_SEPARATOR)


def matching_paths(base_params, targets: Sequence[str]) -> list[str]:
  """The "/"-joined paths of the leaves of `base_params` that match any regex in `targets`.

  Args:
    base_params: a Flax parameter tree (dict or FrozenDict).
    targets: regexes on "/"-joined paths.

  Returns:
    The matching paths, in tree order.
  """
  if isinstance(targets, str):
    raise ValueError(f"targets={targets!r} is a string; expected a sequence of regexes")
  patterns = [re.compile(target) for target in targets]
  paths = []
  for path, _ in jax.tree_util.tree_flatten_with_path(base_params)[0]:
    path_string = _path_string(path)
    if any(pattern.search(path_string) for pattern in patterns):
      paths.append(path_string)
  return paths


def init_lora(
  base_params,
  targets: Sequence[str],
  rank: int,
  rng: jax.Array,
  init_std: float | None = None,
  dtype=jnp.float32,
) -> dict:
  """LoRA adapters for the 2-D kernels of `base_params` whose paths match `targets`.

    a ~ N(0, init_std^2), (n_in, r);   b = 0, (r, n_out);   init_std defaults to 1/r.

  Args:
    base_params: the frozen parameter tree (e.g. the UNet's).
    targets: regexes on "/"-joined param paths; each match must be a 2-D kernel.
    rank: r, the adapter rank.
    rng: key; the adapter at the k-th matching path draws from `fold_in(rng, k)`.
    init_std: std of `a`; None = 1/rank (diffusers' LoRALinearLayer).
    dtype: dtype of the adapters (trainable params stay float32 by default).

  Returns:
    A nested dict mirroring the matched paths, each ending in {"a": (n_in, r), "b": (r, n_out)}.
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"LoRA rank={rank!r}; expected a positive integer")
  std = 1.0 / rank if init_std is None else init_std
  leaves = {
    _path_string(path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(base_params)[0]}
  paths = matching_paths(base_params, targets)
  if not paths:
    raise ValueError(f"no parameter path matches the LoRA targets {tuple(targets)!r}")
  flat = {}
  for index, path in enumerate(paths):
    shape = np.shape(leaves[path])
    if len(shape) != 2:
      raise ValueError(
        f"LoRA target {path!r} has shape {shape}; expected a 2-D Dense kernel (n_in, n_out)")
    fan_in, fan_out = shape
    key = jax.random.fold_in(rng, index)
    flat[tuple(path.split(PATH_SEPARATOR)) + ("a",)] = (
      std * jax.random.normal(key, (fan_in, rank), jnp.float32)).astype(dtype)
    flat[tuple(path.split(PATH_SEPARATOR)) + ("b",)] = jnp.zeros((rank, fan_out), dtype)
  return flax.traverse_util.unflatten_dict(flat)


def _adapters_by_path(lora_params) -> dict[str, dict]:
  flat = flax.traverse_util.flatten_dict(lora_params)
  adapters = {}
  for key, value in flat.items():
    *path, name = key
    if name not in ("a", "b"):
      raise ValueError(f"LoRA leaf {PATH_SEPARATOR.join(key)!r}; expected names 'a' and 'b'")
    adapters.setdefault(PATH_SEPARATOR.join(path), {})[name] = value
  return adapters


def merge_lora(base_params, lora_params, alpha: float, rank: int):
  """Base params with the adapters folded in: W' = W + (alpha / r) A B at each adapted path.

  Pure and differentiable w.r.t. `lora_params`; `base_params` is not modified and the tree
  keeps its structure and container types. The update is computed in float32 and cast to W's
  dtype.

  Args:
    base_params: the frozen parameter tree.
    lora_params: adapters from `init_lora` (or trained ones).
    alpha: LoRA alpha; the update is scaled by alpha / rank.
    rank: r, the adapter rank.

  Returns:
    A tree like `base_params`.
  """
  adapters = _adapters_by_path(lora_params)
  scale = alpha / rank
  merged_paths = set()

  def merge_leaf(path, weight):
    path_string = _path_string(path)
    adapter = adapters.get(path_string)
    if adapter is None:
      return weight
    merged_paths.add(path_string)
    a, b = adapter["a"], adapter["b"]
    if a.shape[1] != rank or b.shape[0] != rank:
      raise ValueError(
        f"LoRA adapter {path_string!r} has rank {a.shape[1]}/{b.shape[0]}; expected rank={rank}")
    update = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    return (weight.astype(jnp.float32) + update).astype(weight.dtype)

  merged = jax.tree_util.tree_map_with_path(merge_leaf, base_params)
  missing = sorted(set(adapters) - merged_paths)
  if missing:
    raise ValueError(f"LoRA adapters {missing} have no matching base parameter")
  return merged


def count_params(tree) -> int:
  """Total number of scalar entries in the leaves of `tree`."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))
