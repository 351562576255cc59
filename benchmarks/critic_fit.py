"""How much can the critic learn, and how fast? Offline value fits on one policy's states.

  python benchmarks/critic_fit.py --config=configs/shapes.py [--samples=256] [--batch=32]
      [--updates=10,30,100,300,1000] [--learning_rates=1e-4,1e-3,1e-2] [--init_stds=0,0.05]
      [--out=fits.csv]

Samples `--samples` trajectories of the config's pre-trained policy (its training prompts, its
sampler), scores them with the config's reward, normalises each prompt's rewards by that prompt's
mean / std over the set (the per-prompt normaliser at steady state) or, with
`stats.per_prompt=False`, by the whole set's (these are the returns G every state of a trajectory
shares), and embeds every visited state x_T .. x_1 with the config's critic tower
(`critic.tower`), as the trainer does. The last quarter of the samples is held out. Then:

  * `ridge`: the best affine value function of the embedding, by least squares on the training
    samples (ridge 1e-3): one fit per state k ("per-state"), and one over all states ("shared":
    what one critic network can at best represent, being affine itself by default);
  * `critic`: the config's critic MLP (`config.critic`, its init and dropout) trained with AdamW
    (`config.train`'s betas, weight decay, gradient clip) on the ½ squared value error, each
    update on `--batch` random (sample, state) pairs, for every learning rate x init std; held-out
    explained variance after each of `--updates` updates.

Prints one row per fit: held-out explained variance over all states, over the late states
(`critic.late_fraction`) and per state k. A TDPO-R run makes `train.num_updates` critic updates
per epoch (10 on configs/shapes.py) and resets every `reset.period` epochs: the table says how
much of the attainable value a critic reaches in that many updates.
"""
import csv
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
_SAMPLES = flags.DEFINE_integer("samples", 256, "Trajectories to sample (a multiple of the "
                                "config's samples per epoch).")
_BATCH = flags.DEFINE_integer("batch", 32, "(sample, state) pairs per critic update.")
_UPDATES = flags.DEFINE_list("updates", ["10", "30", "100", "300", "1000"],
                             "Critic updates after which the held-out EV is measured.")
_LEARNING_RATES = flags.DEFINE_list("learning_rates", ["1e-4", "1e-3", "1e-2"],
                                    "Critic learning rates.")
_INIT_STDS = flags.DEFINE_list("init_stds", ["0", "0.05"],
                               "Critic init stds (0 = the paper's 1/(d+1)).")
_OUT = flags.DEFINE_string("out", "", "Optional CSV of the rows.")
flags.mark_flags_as_required(["config"])

HELD_OUT_FRACTION = 0.25
RIDGE = 1e-3
FIT_SEED = 0


def explained_variance(values, returns):
  """1 - var(G - V) / var(G) (population variances), NaN for constant G."""
  variance = np.var(returns)
  return float(1.0 - np.var(returns - values) / variance) if variance > 0 else float("nan")


def per_prompt_standardise(rewards, prompt_index, eps=1e-6):
  """(r - mean_p) / (std_p + eps) with each prompt's own statistics over the set."""
  out = np.empty_like(rewards)
  for prompt in np.unique(prompt_index):
    rows = prompt_index == prompt
    out[rows] = (rewards[rows] - rewards[rows].mean()) / (rewards[rows].std() + eps)
  return out


def affine_fit(x, y, ridge=RIDGE):
  """Least-squares w, b of y ~ x w + b with an L2 penalty `ridge` on w; x (n, d), y (n,)."""
  x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  penalty = ridge * np.eye(x1.shape[1])
  penalty[-1, -1] = 0.0
  return np.linalg.solve(x1.T @ x1 + penalty, x1.T @ y)


def affine_predict(coef, x):
  return x @ coef[:-1] + coef[-1]


def ev_row(values, returns, late_start):
  """{"ev": all states, "ev_late": states >= late_start, "ev_kNN": per state}; (n, T) arrays."""
  row = {"ev": explained_variance(values, returns),
         "ev_late": explained_variance(values[:, late_start:], returns[:, late_start:])}
  for k in range(values.shape[1]):
    row[f"ev_k{k:02d}"] = explained_variance(values[:, k], returns[:, k])
  return row


def collect(config, num_samples):
  """(embeds (n, T, d), returns (n, T)) of `num_samples` pre-trained-policy trajectories."""
  from tdpo_jax import sharding as sharding_lib  # noqa: PLC0415
  from tdpo_jax import config_checks  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  config_checks.validate_config(config)  # the Trainer does not validate (train.run does)
  trainer = train.Trainer(config)
  frozen = trainer.frozen_params()
  state = trainer.init_state()
  per_epoch = config_checks.samples_per_epoch(config)
  embeds, rewards, prompt_index = [], [], []
  for epoch in range(-(-num_samples // per_epoch)):
    trajectory, index = trainer.sample(state, frozen, epoch)
    images = sharding_lib.to_host(trajectory.images)
    rewards.append(np.asarray(trainer.reward_fn(images, [trainer.prompts[i] for i in index]),
                              np.float64))
    embeds.append(np.asarray(trainer.embed_states(frozen, trajectory), np.float64))
    prompt_index.append(index)
  embeds = np.concatenate(embeds)[:num_samples]
  rewards = np.concatenate(rewards)[:num_samples]
  if config.stats.per_prompt:
    normalised = per_prompt_standardise(rewards, np.concatenate(prompt_index)[:num_samples])
  else:
    normalised = (rewards - rewards.mean()) / (rewards.std() + config.stats.eps)
  return embeds, np.broadcast_to(normalised[:, None], embeds.shape[:2]).copy()


def ridge_rows(train_x, train_g, test_x, test_g, late_start):
  """The per-state and the shared affine fits' held-out rows."""
  steps = train_x.shape[1]
  per_state = np.stack([affine_predict(affine_fit(train_x[:, k], train_g[:, k]), test_x[:, k])
                        for k in range(steps)], axis=1)
  shared = affine_fit(train_x.reshape(-1, train_x.shape[-1]), train_g.reshape(-1))
  shared = affine_predict(shared, test_x.reshape(-1, test_x.shape[-1])).reshape(test_g.shape)
  return [dict(fit="ridge per-state", **ev_row(per_state, test_g, late_start)),
          dict(fit="ridge shared", **ev_row(shared, test_g, late_start))]


def critic_rows(config, train_x, train_g, test_x, test_g, late_start):
  """Held-out rows of the critic MLP trained by AdamW, per (learning rate, init std, updates)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from tdpo_jax import critic as critic_lib  # noqa: PLC0415
  from tdpo_jax import train_step as train_step_lib  # noqa: PLC0415
  flat_x = jnp.asarray(train_x.reshape(-1, train_x.shape[-1]), jnp.float32)
  flat_g = jnp.asarray(train_g.reshape(-1), jnp.float32)
  checkpoints = sorted(int(u) for u in _UPDATES.value)
  rows = []
  for learning_rate in (float(v) for v in _LEARNING_RATES.value):
    for init_std in (float(v) for v in _INIT_STDS.value):
      critic_config = config.critic.copy_and_resolve_references()
      critic_config.init_std = init_std
      critic = critic_lib.make_critic(critic_config, train_x.shape[-1])
      optimizer = train_step_lib.make_optimizer(config.train, learning_rate)
      key = jax.random.key(FIT_SEED)
      params = critic.init(key, flat_x[:1], deterministic=True)["params"]
      opt_state = optimizer.init(params)

      @jax.jit
      def updates(params, opt_state, key, count, critic=critic, optimizer=optimizer):
        def step(carry, index):
          params, opt_state = carry
          batch_key, dropout_key = jax.random.split(jax.random.fold_in(key, index))
          rows_ = jax.random.randint(batch_key, (_BATCH.value,), 0, flat_x.shape[0])

          def loss_fn(p):
            values = critic.apply({"params": p}, flat_x[rows_], deterministic=False,
                                  rngs={"dropout": dropout_key})
            return 0.5 * jnp.mean((values - flat_g[rows_]) ** 2)

          grads = jax.grad(loss_fn)(params)
          update, opt_state = optimizer.update(grads, opt_state, params)
          return (optax.apply_updates(params, update), opt_state), None

        return jax.lax.scan(step, (params, opt_state), count)[0]

      done = 0
      for target in checkpoints:
        params, opt_state = updates(params, opt_state, jax.random.fold_in(key, done),
                                    jnp.arange(done, target))
        done = target
        values = critic.apply({"params": params},
                              jnp.asarray(test_x.reshape(-1, test_x.shape[-1]), jnp.float32),
                              deterministic=True)
        rows.append(dict(fit=f"critic lr {learning_rate:g} init_std "
                             f"{critic.init_std:.3g} updates {target}",
                         **ev_row(np.asarray(values, np.float64).reshape(test_g.shape), test_g,
                                  late_start)))
  return rows


def main(argv):
  del argv
  config = _CONFIG.value
  config.log.progress = False
  from tdpo_jax import epoch  # noqa: PLC0415
  if _SAMPLES.value < 8:
    raise SystemExit(f"error: --samples={_SAMPLES.value}; expected >= 8")
  embeds, returns = collect(config, _SAMPLES.value)
  split = int(len(embeds) * (1 - HELD_OUT_FRACTION))
  late_start = epoch.late_states(config.sample.num_steps, config.critic.late_fraction)
  args = (embeds[:split], returns[:split], embeds[split:], returns[split:], late_start)
  rows = ridge_rows(*args) + critic_rows(config, *args)
  steps = embeds.shape[1]
  print(f"{len(embeds)} samples ({split} fit, {len(embeds) - split} held out), tower "
        f"{config.critic.tower!r} (d = {embeds.shape[-1]}), reward {config.reward!r}; held-out "
        f"explained variance of the "
        f"{'per-prompt' if config.stats.per_prompt else 'batch'}-normalised reward:")
  shown = [f"ev_k{k:02d}" for k in range(steps)]
  print(f"{'fit':<42} {'all':>6} {'late':>6} " + " ".join(f"{k[3:]:>6}" for k in shown))
  for row in rows:
    print(f"{row['fit']:<42} {row['ev']:+6.3f} {row['ev_late']:+6.3f} "
          + " ".join(f"{row[k]:+6.3f}" for k in shown))
  if _OUT.value:
    with open(_OUT.value, "w", newline="") as file:
      writer = csv.DictWriter(file, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)


if __name__ == "__main__":
  app.run(main)
