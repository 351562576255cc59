"""Checkpoints of the whole `TrainState` with orbax, for exact resume (DESIGN §5).

Layout under `<workdir>/checkpoints/` (one orbax step per saved epoch boundary):

  <E>/state/   the `TrainState` after E completed epochs (`StandardSave`): step, epoch, policy
               params + AdamW state, critic params + AdamW state, normaliser buffers,
               reset_count, and the root key as raw key data (uint32 (2,) for threefry).
  <E>/meta/    JSON: the config, epoch, step, key impl, format version. No host-side state is
               needed: every key folds (seed, stream, epoch, step) into the root key and the
               prompt sampler is `np.random.default_rng([seed, epoch])`.

The step number E is `state.epoch`, the number of completed epochs, so resuming from E runs
epoch index E next. Saves are atomic (orbax writes `<E>.orbax-checkpoint-tmp*` and renames it
once complete), so a process killed mid-save leaves the previous step as the latest one; stale
temporary directories are removed when the next manager opens the directory.

One run per workdir: `workdir_lock` holds an exclusive lock on `<workdir>/.run.lock` while a run
trains, so a second run started on the same workdir stops with an error instead of interleaving
its metrics and checkpoints with the first one's.
"""
import contextlib
import fcntl
import fnmatch
import json
import logging as python_logging
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
# Config keys (fnmatch patterns on dotted paths) that may differ between a run and its resume;
# the mesh and sharding rules may change too (orbax reshards the state on restore).
RESUMABLE_KEY_PATTERNS = ("num_epochs", "log.*", "eval.*", "checkpoint.*",
                          "pretrained.cache_dir", "mesh", "num_devices", "sharding.*")
# Config keys added after checkpoints were written without them, each with the value that
# reproduces the behaviour from before it existed: a saved config that lacks the key is read as
# holding that value, so such a checkpoint still resumes under a config that keeps it.
ADDED_KEY_DEFAULTS = {
    "critic.tower": "image_encoder",
    "critic.late_fraction": 0.3,
    "stats.per_prompt": True,
    "sample.group_size": 0,
}


class _DropOrbaxInfo(python_logging.Filter):
  """Hides orbax's INFO lines (about 30 per save); its warnings and errors still show."""

  def filter(self, record):
    return (record.levelno >= python_logging.WARNING
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


def quiet_orbax_logging():
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


def checkpoint_dir(workdir):
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)


def make_manager(workdir, *, max_to_keep=None, async_save=True, create=True):
  """An orbax `CheckpointManager` over `<workdir>/checkpoints` with items `state` and `meta`.

  Args:
    workdir: the run directory.
    max_to_keep: the number of latest checkpoints kept; None or <= 0 keeps all.
    async_save: write in a background thread (the device-to-host copy stays synchronous).
    create: create the directory (and remove stale temporary ones); False for a read-only look.
  """
  quiet_orbax_logging()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep if max_to_keep and max_to_keep > 0 else None,
      create=create, cleanup_tmp_directories=create,
      enable_async_checkpointing=bool(async_save))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "meta"))


def latest(workdir):
  """(step, meta) of the latest finalized checkpoint in `workdir`, or (None, None).

  Reads only; creates nothing (safe before the config has been checked).
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None, None
  manager = make_manager(workdir, async_save=False, create=False)
  try:
    step = manager.latest_step()
    return (None, None) if step is None else (step, restore_meta(manager, step))
  finally:
    manager.close()


def config_to_dict(config):
  """The config as plain JSON types (tuples become lists), as stored in the checkpoint meta."""
  return json.loads(config.to_json_best_effort())


def to_storable(state):
  """`state` with the typed PRNG key replaced by its raw key data (orbax stores plain arrays)."""
  return state.replace(rng=jax.random.key_data(state.rng))


def from_storable(state, key_impl):
  """Inverse of `to_storable`: wraps the stored key data back into a typed key of `key_impl`."""
  return state.replace(rng=jax.random.wrap_key_data(state.rng, impl=key_impl))


def _abstract_leaf(leaf):
  sharding = getattr(leaf, "sharding", None)
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, leaf)  # (..., 2) uint32 for threefry
    if isinstance(leaf, jax.Array):
      sharding = jax.random.key_data(leaf).sharding
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def abstract_state(state):
  """The storable form of a `TrainState` of arrays or `jax.ShapeDtypeStruct`s, as
  `jax.ShapeDtypeStruct`s that keep each leaf's sharding (typed keys become key data)."""
  return jax.tree.map(_abstract_leaf, state)


def save(manager, state, config):
  """Saves `state` under step `state.epoch`, after waiting for the previous save.

  With an async manager this returns once the arrays are copied to the host (orbax's default
  synchronous device-to-host transfer), so the caller may donate them; the write continues in
  the background until `manager.wait_until_finished()`.
  """
  epoch = int(state.epoch)
  manager.wait_until_finished()
  meta = {"format_version": FORMAT_VERSION, "epoch": epoch, "step": int(state.step),
          "key_impl": str(jax.random.key_impl(state.rng)), "config": config_to_dict(config)}
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(to_storable(state)),
                                              meta=ocp.args.JsonSave(meta)), force=True)
  logging.info("checkpoint %d (the state after epoch %d): saving to %s", epoch, epoch - 1,
               manager.directory)


def restore_meta(manager, step):
  """The JSON meta saved with `step` (a dict with `config`, `epoch`, `step`, `key_impl`)."""
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager, step, template):
  """Restores the `TrainState` saved at `step`.

  Args:
    manager: from `make_manager`.
    step: a finalized step (`manager.latest_step()`).
    template: a `TrainState` of arrays or of `jax.ShapeDtypeStruct`s (rng a typed key) giving
      the tree structure, shapes, dtypes and shardings of the result.

  Returns:
    (state, meta): the restored `TrainState` with a typed key, and the JSON meta.
  """
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state(template)), meta=ocp.args.JsonRestore()))
  meta = restored["meta"]
  return from_storable(restored["state"], meta["key_impl"]), meta


def flatten(tree, prefix=""):
  """A nested dict as {"a.b.c": leaf}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def config_differences(saved, current):
  """Dotted keys whose values differ between two config dicts, ignoring the resumable keys.

  Returns:
    a sorted list of (key, saved value, current value); a key missing on one side gives
    "<missing>" there, except that a saved config lacking a key of `ADDED_KEY_DEFAULTS` holds its
    default there.
  """
  saved, current = flatten(saved), flatten(current)
  saved = {**{k: v for k, v in ADDED_KEY_DEFAULTS.items() if k in current}, **saved}
  differences = []
  for key in sorted(set(saved) | set(current)):
    if any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEY_PATTERNS):
      continue
    old, new = saved.get(key, "<missing>"), current.get(key, "<missing>")
    if old != new:
      differences.append((key, old, new))
  return differences


def check_compatible(saved_config, config, workdir):
  """Raises ValueError naming every key whose value differs from the checkpoint's config."""
  differences = config_differences(saved_config, config_to_dict(config))
  if differences:
    listed = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, old, new in differences)
    raise ValueError(
        f"workdir {workdir!r} holds a checkpoint of an incompatible config ({listed}); expected "
        f"the same values (only {', '.join(RESUMABLE_KEY_PATTERNS)} may change), or use a new "
        "--workdir")


LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive, non-blocking lock on `<workdir>/.run.lock` (created if needed).

  The OS drops the lock when its holder exits, however it exits, so a killed run leaves no stale
  lock. Raises ValueError naming the workdir if another process (or another open run in this
  one) holds it.
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_NAME), "a") as file:
    try:
      fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise ValueError(f"workdir {workdir!r} is in use by another run (it holds "
                       f"{LOCK_NAME}); wait for it or stop it, or use a new --workdir") from None
    try:
      yield
    finally:
      fcntl.flock(file, fcntl.LOCK_UN)
