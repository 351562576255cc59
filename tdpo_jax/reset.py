"""Dormancy scores and the masked re-initialisation of critic neurons (DESIGN §3, STYLE masks).

Shape legend:
  N    probe size (64 embeddings, whatever the device count)
  d    embedding width
  d_l  width of hidden layer l of the critic (default 1024, 128, 64, 16)
  L    number of hidden layers (4)

Scores. For hidden layer l with pre-activations h(x) in R^{d_l} over the probe x,

  s_i = mean_x relu(h_i(x)) / (mean_j mean_x relu(h_j(x)) + eps),   eps = 1e-9.

Neuron i is *dormant* if s_i <= tau and *active* otherwise. With tau = 0 a neuron is dormant
exactly when its pre-activation is <= 0 for every probe sample. (The official critic is linear;
the ReLU is applied only for scoring.)

Reset. TDPO-R re-initialises the *active* neurons (ReDo: the dormant ones). For a neuron mask
m_l (d_l,) of hidden layer l:

  W_l[:, m_l]     <- N(0, sigma^2)     incoming weights
  b_l[m_l]        <- 0                 bias
  W_{l+1}[m_l, :] <- N(0, sigma^2)     outgoing weights (W_{l+1} = `output` for the last layer)

and the AdamW moments (mu, nu) of exactly those entries are set to 0; the step `count` is kept.
Implemented as masks over the parameter pytree: the neuron masks are broadcast into a
params-shaped bool tree (a kernel W_{l+1} can be hit by the rows of m_l and the columns of
m_{l+1}: they are OR-ed), a params-shaped `fresh` tree is drawn, and
`new = where(mask, fresh, old)` leaf by leaf; one jittable function, no loop over neurons.

Randomness comes only from the `rng` argument (the caller passes `fold_in(seed_key,
reset_index)`), so each reset draws **new** fresh values. The official code instead re-seeds the
global torch RNG with the run seed before every reset, so all its resets draw the very same values.
"""
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax

from tdpo_jax import critic as critic_lib

TARGETS = ("active", "dormant")


def _layer_names(critic: critic_lib.CriticMLP) -> list[str]:
  """Dense layer names in forward order: hidden_0 ... hidden_{L-1}, output."""
  return [f"hidden_{index}" for index in range(len(critic.hidden_sizes))] + ["output"]


def _check_params(critic: critic_lib.CriticMLP, params) -> None:
  expected = set(_layer_names(critic))
  if set(params.keys()) != expected:
    raise ValueError(
      f"critic params have layers {sorted(params.keys())}; expected {sorted(expected)} "
      "(pass variables['params'], not the whole variables dict)")


def hidden_preactivations(
  critic: critic_lib.CriticMLP, params, probe: jax.Array
) -> tuple[jax.Array, ...]:
  """Pre-activations h_l = x_{l-1} W_l + b_l of every hidden layer, dropout off.

  Args:
    critic: the critic module.
    params: its parameters (`variables["params"]`).
    probe: (N, d) probe embeddings.

  Returns:
    A tuple of L arrays, layer l of shape (N, d_l).
  """
  _, state = critic.apply(
    {"params": params}, probe, deterministic=True, mutable=["intermediates"])
  intermediates = state["intermediates"]
  return tuple(
    intermediates[critic_lib.preactivation_name(index)][0]
    for index in range(len(critic.hidden_sizes)))


def dormancy_scores(
  preacts: Sequence[jax.Array], eps: float = 1e-9
) -> tuple[jax.Array, ...]:
  """Per-neuron scores s_i = mean_x relu(h_i(x)) / (mean_j mean_x relu(h_j(x)) + eps).

  Args:
    preacts: per layer, (N, d_l) pre-activations over the probe.
    eps: added to the layer mean so an all-dormant layer scores 0, not NaN.

  Returns:
    A tuple of (d_l,) scores, one per layer.
  """
  scores = []
  for layer_preacts in preacts:
    neuron_activity = jnp.mean(jax.nn.relu(layer_preacts), axis=0)
    scores.append(neuron_activity / (jnp.mean(neuron_activity) + eps))
  return tuple(scores)


def neuron_masks(
  scores: Sequence[jax.Array], tau, target: str
) -> tuple[jax.Array, ...]:
  """Which neurons to reset: dormant = s <= tau, active = s > tau.

  Args:
    scores: per layer, (d_l,) dormancy scores.
    tau: the dormancy threshold (0.0 in the paper).
    target: "active" (TDPO-R) resets the active neurons, "dormant" (ReDo) the dormant ones.

  Returns:
    A tuple of (d_l,) bool masks, True = reset.
  """
  if target not in TARGETS:
    raise ValueError(f"reset target={target!r}; expected one of {TARGETS}")
  dormant = tuple(layer_scores <= tau for layer_scores in scores)
  if target == "dormant":
    return dormant
  return tuple(jnp.logical_not(layer_dormant) for layer_dormant in dormant)


def params_mask(critic: critic_lib.CriticMLP, params, masks: Sequence[jax.Array]):
  """Broadcasts neuron masks into a params-shaped bool tree.

  For Dense layer k (hidden_0 ... output) with kernel (d_{k-1}, d_k):
    kernel_mask = m_{k-1}[:, None] | m_k[None, :]   (m_{-1} = m_out = all False)
    bias_mask   = m_k                               (the output bias is never reset)

  Args:
    critic: the critic module.
    params: its parameters (`variables["params"]`).
    masks: per hidden layer, (d_l,) bool neuron masks.

  Returns:
    A tree with the structure and shapes of `params`, bool leaves.
  """
  _check_params(critic, params)
  names = _layer_names(critic)
  if len(masks) != len(critic.hidden_sizes):
    raise ValueError(
      f"got {len(masks)} neuron masks; expected one per hidden layer ({len(critic.hidden_sizes)})")

  def leaf_mask(path, leaf):
    layer_name, leaf_name = path[-2].key, path[-1].key
    index = names.index(layer_name)
    columns = masks[index] if index < len(masks) else jnp.zeros(leaf.shape[-1], bool)
    if leaf_name == "bias":
      return columns
    if leaf_name != "kernel":
      raise ValueError(f"critic param {layer_name}/{leaf_name}; expected 'kernel' or 'bias'")
    rows = masks[index - 1] if index > 0 else jnp.zeros(leaf.shape[0], bool)
    return jnp.logical_or(rows[:, None], columns[None, :])

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def fresh_params(critic: critic_lib.CriticMLP, params, rng: jax.Array, init_std):
  """A params-shaped re-initialisation: kernels ~ N(0, init_std^2), biases 0.

  Args:
    critic: the critic module.
    params: its parameters (for structure, shapes and dtypes).
    rng: key; layer k draws from `fold_in(rng, k)`.
    init_std: sigma, the critic's init standard deviation (1/(d+1)).

  Returns:
    A tree like `params`.
  """
  _check_params(critic, params)
  names = _layer_names(critic)

  def leaf_fresh(path, leaf):
    layer_name, leaf_name = path[-2].key, path[-1].key
    if leaf_name == "bias":
      return jnp.zeros_like(leaf)
    key = jax.random.fold_in(rng, names.index(layer_name))
    return (init_std * jax.random.normal(key, leaf.shape, jnp.float32)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(leaf_fresh, params)


def _fraction_stats(masks_by_name: dict[str, Sequence[jax.Array]]) -> dict[str, jax.Array]:
  stats = {}
  for name, masks in masks_by_name.items():
    for index, mask in enumerate(masks):
      stats[f"reset/{name}_frac/l{index}"] = jnp.mean(mask.astype(jnp.float32))
    total = sum(jnp.sum(mask.astype(jnp.float32)) for mask in masks)
    stats[f"reset/{name}_frac"] = total / sum(mask.size for mask in masks)
  return stats


def dormant_fractions(
  critic: critic_lib.CriticMLP, params, probe: jax.Array, tau
) -> dict[str, jax.Array]:
  """Per-layer and total fraction of dormant neurons (s <= tau), for per-epoch logging.

  Args:
    critic: the critic module.
    params: its parameters (`variables["params"]`).
    probe: (N, d) probe embeddings.
    tau: the dormancy threshold.

  Returns:
    {"reset/dormant_frac/l{i}": scalar, ..., "reset/dormant_frac": scalar} (float32).
  """
  scores = dormancy_scores(hidden_preactivations(critic, params, probe))
  return _fraction_stats({"dormant": neuron_masks(scores, tau, "dormant")})


def state_initable(params, opt_state):
  """An init fn for `optax.tree_utils.tree_map_params` when the optimizer is not at hand.

  It returns `opt_state` with every subtree whose tree structure equals that of `params`
  (Adam's mu and nu, ...) replaced by the placeholder it is given, which is what
  `optimizer.init(placeholder)` returns for optax's transformations.

  Args:
    params: the parameter tree the optimizer state was built for.
    opt_state: the optimizer state.

  Returns:
    A callable placeholder -> state with placeholders.
  """
  params_structure = jax.tree.structure(params)

  def is_params_shaped(node):
    return jax.tree.structure(node) == params_structure

  def init(placeholder):
    return jax.tree.map(
      lambda node: placeholder if is_params_shaped(node) else node, opt_state,
      is_leaf=is_params_shaped)

  return init


def reset_critic(
  critic: critic_lib.CriticMLP,
  params,
  opt_state: Any,
  probe: jax.Array,
  rng: jax.Array,
  *,
  tau,
  target: str,
  init_std,
  optimizer: optax.GradientTransformation | None = None,
) -> tuple[Any, Any, dict[str, jax.Array]]:
  """Re-initialises the active (or dormant) critic neurons and zeroes their AdamW moments.

    mask   = broadcast(neuron_masks(s, tau, target))     (params-shaped, bool)
    params <- where(mask, fresh, params),   fresh ~ N(0, init_std^2) kernels, 0 biases
    mu, nu <- where(mask, 0, mu / nu)                      (count and other state untouched)

  Jittable with `critic`, `target` and `optimizer` static (see `jit_reset_critic`); build the
  optimizer once, since a new `optax.chain(...)` object is a new static argument (a recompile).

  Args:
    critic: the critic module.
    params: its parameters (`variables["params"]`).
    opt_state: the critic optimizer's state over `params`, e.g. from
      `optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(...))`.
    probe: (N, d) probe embeddings.
    rng: the reset's key, `fold_in(seed_key, reset_index)`.
    tau: dormancy threshold (s <= tau is dormant).
    target: "active" (TDPO-R) or "dormant" (ReDo).
    init_std: sigma of the fresh weights (1/(d+1), as at init).
    optimizer: the transformation that made `opt_state`; `optax.tree_utils.tree_map_params`
      uses it to find every params-shaped subtree of the state (mu, nu, ...). None: those
      subtrees are found by matching the params' tree structure (`state_initable`), which for
      `chain(clip_by_global_norm, adamw)` selects the same subtrees.

  Returns:
    (params, opt_state, stats) with stats, float32 scalars per layer i:
    `reset/dormant_frac/l{i}`, `reset/active_frac/l{i}`, `reset/num_reset/l{i}` (neurons), and the
    totals `reset/dormant_frac`, `reset/active_frac`, `reset/num_reset`,
    `reset/num_reset_entries` (parameter entries re-drawn or zeroed).
  """
  scores = dormancy_scores(hidden_preactivations(critic, params, probe))
  masks = neuron_masks(scores, tau, target)
  mask_tree = params_mask(critic, params, masks)
  fresh = fresh_params(critic, params, rng, init_std)
  new_params = jax.tree.map(
    lambda mask, new, old: jnp.where(mask, new, old), mask_tree, fresh, params)
  initable = state_initable(params, opt_state) if optimizer is None else optimizer
  new_opt_state = optax.tree_utils.tree_map_params(
    initable,
    lambda value, mask: jnp.where(mask, jnp.zeros_like(value), value),
    opt_state,
    mask_tree,
  )

  dormant = neuron_masks(scores, tau, "dormant")
  active = neuron_masks(scores, tau, "active")
  stats = _fraction_stats({"dormant": dormant, "active": active})
  for index, mask in enumerate(masks):
    stats[f"reset/num_reset/l{index}"] = jnp.sum(mask.astype(jnp.float32))
  stats["reset/num_reset"] = sum(jnp.sum(mask.astype(jnp.float32)) for mask in masks)
  stats["reset/num_reset_entries"] = sum(
    jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(mask_tree))
  return new_params, new_opt_state, stats


jit_reset_critic = jax.jit(reset_critic, static_argnames=("critic", "target", "optimizer"))
