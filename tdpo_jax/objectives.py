"""Returns, advantages, the PPO-clip policy loss, the clipped value loss and KL terms (DESIGN §3).

Shape legend: B batch (samples), T DDIM steps; step index k = 0 is the first denoising step
(x_T -> x_{T-1}, t = 981 for T = 50), k = T-1 the last (x_1 -> x_0). C, h, w latent dims (NCHW).
Every function here is pure and jittable; losses are means over all the entries they are given.
"""
import jax
import jax.numpy as jnp


def standardise(x, eps=1e-8):
  """Standardises over all entries: (x - mean(x)) / (std(x) + eps), population std.

  Args:
    x: any shape.
    eps: added to the std (1e-8 for advantages, DESIGN §3).

  Returns:
    x's shape.
  """
  return (x - jnp.mean(x)) / (jnp.std(x) + eps)


def returns_from_rewards(normalised_rewards, num_steps, kl_penalty=None, kl_coef=0.0):
  """Per-step returns with gamma = 1 (DESIGN §3), optionally KL-penalised.

  Equation: the only task reward r~ comes at the end of the trajectory, so with gamma = 1 the
  return from step k is G_k = r~ for every k. With the "return_penalty" KL mode each step k also
  gets a per-step reward -coef * p_k, p_k = 1/2 (log pi_k - log pi_ref_k)^2 (`return_kl_penalty`),
  and the return is the reward-to-go

    G_k = r~ - coef * sum_{j >= k} p_j,

  i.e. the penalties of step k and of all later steps along the trajectory. This is what the
  official TDPO code computes (scripts/train_tdpo.py: `returns[:, -1] += r`, `returns +=
  -coef * kl_penalty`, then `returns[:, t] += gamma * returns[:, t + 1]` backwards, with
  `kl_penalty == "square"`), where its two coefficients `kl_penalty_coef * kl_ctl.value` are our
  one `kl_coef`.

  Args:
    normalised_rewards: (B,) r~, the per-prompt normalised rewards.
    num_steps: T.
    kl_penalty: (B, T) p_k in trajectory order, or None for no penalty.
    kl_coef: coef, a scalar.

  Returns:
    (B, T) returns G.
  """
  batch_size = normalised_rewards.shape[0]
  returns = jnp.broadcast_to(normalised_rewards[:, None], (batch_size, num_steps))
  if kl_penalty is None:
    return returns
  if kl_penalty.shape != (batch_size, num_steps):
    raise ValueError(f"kl_penalty has shape {kl_penalty.shape}; expected (B, T) = "
                     f"{(batch_size, num_steps)}")
  penalty_to_go = jnp.flip(jnp.cumsum(jnp.flip(kl_penalty, axis=1), axis=1), axis=1)
  return returns - kl_coef * penalty_to_go


def standardise_advantages(returns, values=None, eps=1e-8):
  """Per-step advantages, standardised over all (sample, step) entries (DESIGN §3).

  Equation: A_k = G_k - V_old(x_k) (TDPO) or A_k = G_k (DDPO, `values=None`), then
  A <- (A - mean(A)) / (std(A) + eps) over all B*T entries. No advantage clipping.

  Args:
    returns: (B, T) G.
    values: (B, T) critic values V_old(x_k) computed with dropout off, or None.
    eps: added to the std (1e-8).

  Returns:
    (B, T) standardised advantages.
  """
  if values is not None and values.shape != returns.shape:
    raise ValueError(f"values has shape {values.shape}; expected the returns' shape "
                     f"{returns.shape}")
  raw = returns if values is None else returns - values
  return standardise(raw, eps)


advantages = standardise_advantages  # The name the task brief uses.


def ppo_policy_loss(log_prob, old_log_prob, advantages, clip_range):
  """PPO-clip policy loss (DESIGN §3; Schulman et al. 2017).

  Equation: rho = exp(log pi_new - log pi_old),
  L = mean(max(-A rho, -A clip(rho, 1 - eps, 1 + eps))), eps = clip_range (1e-4).

  Args:
    log_prob: (B,) log pi_new of the stored transitions (carries the gradient).
    old_log_prob: (B,) log pi_old from the rollout.
    advantages: (B,) advantages of these transitions.
    clip_range: eps.

  Returns:
    (loss scalar, metrics) with metrics "approx_kl" = 1/2 mean((log pi_new - log pi_old)^2)
    (DDPO's estimator; the official TDPO code logs mean(rho - 1 - log rho) instead), "clipfrac" =
    mean(|rho - 1| > eps) (DDPO's; the official TDPO code counts where the clipped term is the
    larger one) and "ratio" = mean(rho).
  """
  log_ratio = log_prob - old_log_prob
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
  loss = jnp.mean(jnp.maximum(unclipped, clipped))
  metrics = {
      "approx_kl": 0.5 * jnp.mean(log_ratio**2),
      "clipfrac": jnp.mean((jnp.abs(ratio - 1.0) > clip_range).astype(jnp.float32)),
      "ratio": jnp.mean(ratio),
  }
  return loss, metrics


def explained_variance(values, returns):
  """Explained variance of the returns by the values: 1 - var(G - V) / var(G).

  1 is a perfect critic, 0 a constant one, negative worse than a constant. When var(G) = 0
  (e.g. every return equal) the ratio is undefined and NaN is returned (logged as such, not
  raised).

  Args:
    values: any shape, V.
    returns: the same shape, G.

  Returns:
    a scalar.
  """
  returns_variance = jnp.var(returns)
  safe_variance = jnp.where(returns_variance > 0, returns_variance, 1.0)
  return jnp.where(returns_variance > 0, 1.0 - jnp.var(returns - values) / safe_variance, jnp.nan)


def masked_explained_variance(values, returns, mask):
  """Explained variance over the entries where `mask` is True: 1 - var_m(G - V) / var_m(G).

  var_m is the population variance over the masked entries. NaN when var_m(G) = 0 (including
  fewer than two masked entries).

  Args:
    values, returns: the same shape, V and G.
    mask: bool, the same shape.

  Returns:
    a scalar.
  """
  weight = mask.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weight), 1.0)

  def variance(x):
    mean = jnp.sum(weight * x) / count
    return jnp.sum(weight * (x - mean) ** 2) / count

  returns_variance = variance(returns)
  safe_variance = jnp.where(returns_variance > 0, returns_variance, 1.0)
  return jnp.where(returns_variance > 0,
                   1.0 - variance(returns - values) / safe_variance, jnp.nan)


def explained_variance_by_step(values, returns, steps, num_steps):
  """Explained variance of each denoising state separately (issue: a critic that learns only at
  the late states shows there, while the all-states figure stays near 0).

  EV_k = masked_explained_variance(V, G, steps == k), k = 0 (x_T) ... num_steps - 1 (x_1).

  Args:
    values, returns: (...) V and G of the epoch's (sample, state) entries.
    steps: (...) int, the state index k of each entry.
    num_steps: T.

  Returns:
    (T,) float32; NaN for a state with no entries or constant returns.
  """
  return jax.vmap(lambda k: masked_explained_variance(values, returns, steps == k))(
      jnp.arange(num_steps))


def clipped_value_loss(values, old_values, returns, clip_range):
  """Clipped value loss (DESIGN §3; PPO2's value clipping).

  Equation: V_clip = V_old + clip(V - V_old, -c, c),
  L = 1/2 mean(max((V - G)^2, (V_clip - G)^2)), c = clip_range (0.2). The 1/2 matters: the
  critic's gradients are clipped to global norm 1.

  Args:
    values: (B,) V(x_k) from the critic being trained (dropout on).
    old_values: (B,) V_old(x_k) from before the update (those used for the advantages).
    returns: (B,) G_k.
    clip_range: c.

  Returns:
    (loss scalar, metrics) with metrics "value_clipfrac" = mean(|V - V_old| > c) (defined for any
    c, unlike the official code's), "explained_variance" of G by V (`explained_variance`) and
    "value_mean" = mean(V).
  """
  clipped_values = old_values + jnp.clip(values - old_values, -clip_range, clip_range)
  loss = 0.5 * jnp.mean(jnp.maximum((values - returns)**2, (clipped_values - returns)**2))
  metrics = {
      "value_clipfrac": jnp.mean((jnp.abs(values - old_values) > clip_range).astype(jnp.float32)),
      "explained_variance": explained_variance(values, returns),
      "value_mean": jnp.mean(values),
  }
  return loss, metrics


def gaussian_kl(mean, ref_mean, std):
  """Closed-form per-step KL between the policy's and the reference's DDIM transitions.

  Equation: both transitions are N(mu, std^2 I) with the same std (DESIGN §3), so per latent
  dimension KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2); averaged (not summed)
  over (C, h, w), consistently with the log-probability being a mean over latent dims:
  KL = mean_{C,h,w} (mu - mu_ref)^2 / (2 std^2).

  Args:
    mean: (B, C, h, w) mu_theta, from `ddim.ddim_mean_std`.
    ref_mean: (B, C, h, w) mu_ref, the same with the pre-trained policy.
    std: (B, 1, 1, 1) or broadcastable, the shared std.

  Returns:
    (B,) KL.
  """
  per_dimension = (mean - ref_mean)**2 / (2 * std**2)
  return jnp.mean(per_dimension, axis=tuple(range(1, per_dimension.ndim)))


def return_kl_penalty(log_prob, ref_log_prob):
  """The official code's per-step KL penalty ("square" mode): 1/2 (log pi - log pi_ref)^2.

  Args:
    log_prob: any shape, e.g. (B, T), log pi of the sampled transitions.
    ref_log_prob: the same shape, log pi_ref of the same transitions.

  Returns:
    the same shape, p >= 0.
  """
  return 0.5 * (log_prob - ref_log_prob)**2
