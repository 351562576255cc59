"""Tests for tdpo_jax/reset.py: dormancy scores, masks, and the masked critic reset."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdpo_jax import critic as critic_lib
from tdpo_jax import reset

HIDDEN_SIZES = (1024, 128, 64, 16)
LEARNING_RATE = 1e-3


def _optimizer():
  # The critic optimizer of DESIGN §3: global-norm clip 1.0, then AdamW.
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4))


def _unit_probe(seed, num, embed_dim):
  probe = jax.random.normal(jax.random.key(seed), (num, embed_dim))
  return probe / jnp.linalg.norm(probe, axis=-1, keepdims=True)


def _init(embed_dim, seed=0, hidden_sizes=HIDDEN_SIZES):
  critic = critic_lib.CriticMLP(
    hidden_sizes=hidden_sizes, dropout_rates=(0.0,) * len(hidden_sizes),
    init_std=critic_lib.critic_init_std(embed_dim))
  params = critic.init(jax.random.key(seed), jnp.zeros((1, embed_dim)), deterministic=True)
  return critic, params["params"]


def _mostly_dormant(params, num_kept=2):
  """Shifts hidden layer l's biases by -10^(l+1), those of its first `num_kept` neurons by +10^(l+1).

  The critic is linear, so each layer's shift must dominate what the previous layers' shifts
  contribute (their pre-activations are ~ ±10^l, times columns of norm ~1). All but
  `num_kept` neurons per layer are then negative on every probe (dormant), the kept ones
  positive (active), and every bias is non-zero.
  """
  params = jax.tree.map(lambda leaf: leaf, params)
  for index in range(len(HIDDEN_SIZES)):
    bias = params[f"hidden_{index}"]["bias"]
    magnitude = 10.0 ** (index + 1)
    shift = jnp.where(jnp.arange(bias.shape[0]) < num_kept, magnitude, -magnitude)
    params[f"hidden_{index}"] = dict(params[f"hidden_{index}"], bias=bias + shift)
  return params


def _train_steps(critic, params, optimizer, probe, num_steps=2):
  """A few AdamW steps on a value loss, so that every moment entry is non-zero."""
  opt_state = optimizer.init(params)
  targets = jnp.linspace(-1.0, 1.0, probe.shape[0])
  for step in range(num_steps):
    def loss_fn(p):
      values = critic.apply({"params": p}, probe, deterministic=True)
      return 0.5 * jnp.mean((values - targets) ** 2)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def _adam_state(opt_state):
  (adam_state,) = [s for s in jax.tree.leaves(
    opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
    if isinstance(s, optax.ScaleByAdamState)]
  return adam_state


def _bits(array):
  array = np.asarray(array)
  return array.view(np.uint32 if array.dtype == np.float32 else np.uint8)


def _expected_param_mask(neuron_masks, params):
  """Independent numpy broadcast: kernel_k = m_{k-1}[:, None] | m_k[None, :], bias_k = m_k."""
  names = [f"hidden_{index}" for index in range(len(neuron_masks))] + ["output"]
  masks = [np.asarray(mask) for mask in neuron_masks]
  expected = {}
  for index, name in enumerate(names):
    fan_in, fan_out = params[name]["kernel"].shape
    rows = masks[index - 1] if index > 0 else np.zeros(fan_in, bool)
    columns = masks[index] if index < len(masks) else np.zeros(fan_out, bool)
    expected[name] = {"kernel": rows[:, None] | columns[None, :], "bias": columns}
  return expected


# --- (a) hand-computed scores --------------------------------------------------------------

def _setup(embed_dim, seed, probe_seed, mostly_dormant=False, trained=False):
  """A critic (optionally mostly dormant, optionally after two Adam steps) and a unit probe.

  Returns:
    (critic, params, opt_state, probe, optimizer, init_std)
  """
  optimizer = _optimizer()
  critic, params = _init(embed_dim, seed=seed)
  probe = _unit_probe(probe_seed, 64, embed_dim)
  if mostly_dormant:
    params = _mostly_dormant(params)
  if trained:
    params, opt_state = _train_steps(critic, params, optimizer, probe)
  else:
    opt_state = optimizer.init(params)
  return critic, params, opt_state, probe, optimizer, critic_lib.critic_init_std(embed_dim)


def _reset(setup, seed, target="active", optimizer="same"):
  """`reset.jit_reset_critic` at tau = 0 on a `_setup` tuple; `optimizer="same"` passes its own."""
  critic, params, opt_state, probe, own_optimizer, init_std = setup
  return reset.jit_reset_critic(
    critic, params, opt_state, probe, jax.random.key(seed), tau=0.0, target=target,
    init_std=init_std, optimizer=own_optimizer if optimizer == "same" else optimizer)


def _hand_built():
  """d = 2, hidden (3, 2, 2, 2), identity activation; kernels and biases set by hand."""
  critic = critic_lib.CriticMLP(
    hidden_sizes=(3, 2, 2, 2), dropout_rates=(0.0, 0.0, 0.0, 0.0), init_std=0.1)
  params = {
    "hidden_0": {"kernel": jnp.array([[1.0, -1.0, 0.0], [0.0, 2.0, -1.0]]),
                 "bias": jnp.array([0.0, 0.0, -0.5])},
    "hidden_1": {"kernel": jnp.array([[1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]),
                 "bias": jnp.array([0.0, 0.0])},
    "hidden_2": {"kernel": jnp.array([[-1.0, 0.0], [0.0, 0.0]]),
                 "bias": jnp.array([-1.0, 0.0])},
    "hidden_3": {"kernel": jnp.zeros((2, 2)), "bias": jnp.array([-1.0, -2.0])},
    "output": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros((1,))},
  }
  probe = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
  return critic, params, probe


# Hand computation, probe x1 = (1, 0), x2 = (0, 1), x3 = (-1, -1):
#   h0 = x W0 + b0:  x1 -> (1, -1, -0.5), x2 -> (0, 2, -1.5), x3 -> (-1, -1, 0.5)
#     mean relu = (1/3, 2/3, 1/6); layer mean 7/18   -> s = (6/7, 12/7, 3/7)
#   h1 = h0 W1 + b1: x1 -> (0.5, 0.5), x2 -> (-1.5, -3.5), x3 -> (-0.5, 1.5)
#     mean relu = (1/6, 2/3); layer mean 5/12        -> s = (2/5, 8/5)
#   h2 = h1 W2 + b2 = (-h1_0 - 1, 0): x1 -> (-1.5, 0), x2 -> (0.5, 0), x3 -> (-0.5, 0)
#     mean relu = (1/6, 0); layer mean 1/12          -> s = (2, 0)
#   h3 = (-1, -2) for every x: mean relu = (0, 0)    -> s = (0, 0)  (0 / (0 + 1e-9))
HAND_SCORES = ((6 / 7, 12 / 7, 3 / 7), (2 / 5, 8 / 5), (2.0, 0.0), (0.0, 0.0))


def test_dormancy_scores_hand_computed():
  critic, params, probe = _hand_built()
  preacts = reset.hidden_preactivations(critic, params, probe)
  np.testing.assert_allclose(preacts[0], [[1, -1, -0.5], [0, 2, -1.5], [-1, -1, 0.5]])
  np.testing.assert_allclose(preacts[1], [[0.5, 0.5], [-1.5, -3.5], [-0.5, 1.5]])
  scores = reset.dormancy_scores(preacts)
  assert len(scores) == len(HAND_SCORES)
  for layer_scores, expected in zip(scores, HAND_SCORES):
    np.testing.assert_allclose(layer_scores, expected, rtol=1e-6, atol=1e-7)


# --- (b) tau ---------------------------------------------------------------------------------

def test_tau_moves_the_split_hand_built():
  critic, params, probe = _hand_built()
  scores = reset.dormancy_scores(reset.hidden_preactivations(critic, params, probe))
  counts = {}
  for tau in (0.0, 0.5, 1.0, 2.0):
    masks = reset.neuron_masks(scores, tau, "dormant")
    counts[tau] = int(sum(np.sum(mask) for mask in masks))
  # tau = 0: only the exactly-non-positive-everywhere neurons (h2_1, h3_0, h3_1) are dormant.
  assert counts == {0.0: 3, 0.5: 5, 1.0: 6, 2.0: 9}
  dormant_at_zero = reset.neuron_masks(scores, 0.0, "dormant")
  assert [list(np.asarray(m)) for m in dormant_at_zero] == [
    [False, False, False], [False, False], [False, True], [True, True]]


def test_tau_monotone_random_critic():
  critic, params = _init(32, seed=3)
  probe = _unit_probe(4, 64, 32)
  scores = reset.dormancy_scores(reset.hidden_preactivations(critic, params, probe))
  counts = [
    int(sum(np.sum(mask) for mask in reset.neuron_masks(scores, tau, "dormant")))
    for tau in np.linspace(0.0, 3.0, 13)]
  assert counts == sorted(counts)
  assert counts[0] < counts[-1]


def test_unknown_target_raises():
  with pytest.raises(ValueError, match="redo"):
    reset.neuron_masks((jnp.zeros(3),), 0.0, "redo")


# --- (c) masked reset invariants -------------------------------------------------------------

@pytest.mark.parametrize("target", ["active", "dormant"])
def test_reset_touches_exactly_the_mask(target):
  setup = _setup(32, seed=1, probe_seed=2, mostly_dormant=True, trained=True)
  critic, params, opt_state, probe, _, _ = setup

  scores = reset.dormancy_scores(reset.hidden_preactivations(critic, params, probe))
  masks = reset.neuron_masks(scores, 0.0, target)
  for mask in masks:  # the setting is informative only if every layer is mixed
    assert 0 < int(np.sum(mask)) < mask.size
  expected_mask = _expected_param_mask(masks, params)

  new_params, new_opt_state, stats = _reset(setup, 7, target)

  old_adam, new_adam = _adam_state(opt_state), _adam_state(new_opt_state)
  np.testing.assert_array_equal(old_adam.count, new_adam.count)
  for name in expected_mask:
    for leaf_name, mask in expected_mask[name].items():
      old, new = np.asarray(params[name][leaf_name]), np.asarray(new_params[name][leaf_name])
      np.testing.assert_array_equal(_bits(new)[~mask], _bits(old)[~mask])
      if leaf_name == "bias":
        np.testing.assert_array_equal(new[mask], 0.0)
      assert np.all(new[mask] != old[mask])  # old entries are all non-zero after training
      for moments in ("mu", "nu"):
        old_moment = np.asarray(getattr(old_adam, moments)[name][leaf_name])
        new_moment = np.asarray(getattr(new_adam, moments)[name][leaf_name])
        assert np.all(old_moment != 0.0)
        np.testing.assert_array_equal(_bits(new_moment)[~mask], _bits(old_moment)[~mask])
        np.testing.assert_array_equal(new_moment[mask], 0.0)

  for index, mask in enumerate(masks):
    assert float(stats[f"reset/num_reset/l{index}"]) == int(np.sum(mask))
    dormant = float(stats[f"reset/dormant_frac/l{index}"])
    assert dormant + float(stats[f"reset/active_frac/l{index}"]) == pytest.approx(1.0)
  assert float(stats["reset/num_reset"]) == sum(int(np.sum(mask)) for mask in masks)
  assert float(stats["reset/num_reset_entries"]) == sum(
    int(np.sum(leaf)) for leaf in jax.tree.leaves(expected_mask))


# --- (d) statistics of the redrawn entries, (e) active vs dormant critics -------------------

def test_full_size_critic_all_active_and_redrawn_std():
  setup = _setup(768, seed=2, probe_seed=3)
  critic, params, _, probe, _, init_std = setup

  fractions = reset.dormant_fractions(critic, params, probe, 0.0)
  # Isotropic random probes and the default init: every neuron is active (DESIGN §3).
  assert float(fractions["reset/dormant_frac"]) == 0.0

  new_params, _, stats = _reset(setup, 11)
  assert float(stats["reset/num_reset"]) == sum(HIDDEN_SIZES)
  assert float(stats["reset/active_frac"]) == 1.0
  for name in ("hidden_0", "hidden_1", "hidden_2", "hidden_3"):
    kernel, old = np.asarray(new_params[name]["kernel"]), np.asarray(params[name]["kernel"])
    assert np.all(kernel != old)
    assert abs(kernel.std() / init_std - 1.0) < 0.05, (name, kernel.std() / init_std)
    assert abs(kernel.mean()) < 4.0 * init_std / np.sqrt(kernel.size)
    np.testing.assert_array_equal(new_params[name]["bias"], 0.0)
  # The output kernel (16, 1) is redrawn as the last hidden layer's outgoing weights.
  new_output, old_output = new_params["output"]["kernel"], params["output"]["kernel"]
  assert np.all(np.asarray(new_output) != np.asarray(old_output))
  np.testing.assert_array_equal(new_params["output"]["bias"], params["output"]["bias"])


def test_mostly_dormant_critic_dormant_target_is_complement():
  setup = _setup(32, seed=5, probe_seed=6, mostly_dormant=True)
  critic, params, _, probe, _, _ = setup

  fractions = reset.dormant_fractions(critic, params, probe, 0.0)
  assert float(fractions["reset/dormant_frac"]) > 0.9

  results = {target: _reset(setup, 8, target) for target in ("active", "dormant")}
  for index, width in enumerate(HIDDEN_SIZES):
    num_active = float(results["active"][2][f"reset/num_reset/l{index}"])
    num_dormant = float(results["dormant"][2][f"reset/num_reset/l{index}"])
    assert num_active + num_dormant == width
    # The neurons whose bias was zeroed by each target are complementary.
    zeroed = {
      target: np.asarray(results[target][0][f"hidden_{index}"]["bias"]) == 0.0
      for target in results}
    np.testing.assert_array_equal(zeroed["active"], ~zeroed["dormant"])
    assert num_active == np.sum(zeroed["active"])


# --- (f) randomness -------------------------------------------------------------------------

def test_reset_randomness_comes_from_rng():
  setup = _setup(32, seed=9, probe_seed=10)
  first, again, other = (_reset(setup, seed)[0] for seed in (1, 1, 2))
  for leaf_first, leaf_again in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
    np.testing.assert_array_equal(_bits(leaf_first), _bits(leaf_again))
  for name in first:
    kernel_first = np.asarray(first[name]["kernel"])
    assert np.all(kernel_first != np.asarray(other[name]["kernel"]))


def test_reset_without_optimizer_finds_the_same_moments():
  """optimizer=None locates mu/nu by the params' tree structure; same result as passing it."""
  setup = _setup(32, seed=12, probe_seed=13, mostly_dormant=True, trained=True)
  with_optimizer, without_optimizer = (
    _reset(setup, 14, optimizer=given) for given in ("same", None))
  assert jax.tree.structure(with_optimizer) == jax.tree.structure(without_optimizer)
  for leaf, other in zip(jax.tree.leaves(with_optimizer), jax.tree.leaves(without_optimizer)):
    np.testing.assert_array_equal(leaf, other)
  adam = _adam_state(without_optimizer[1])
  assert int(np.sum(np.asarray(adam.mu["hidden_0"]["bias"]) == 0.0)) == 2
