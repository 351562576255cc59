"""Checkpoints of the whole `TrainState` with orbax, for exact resume (DESIGN §5).

Layout under `<workdir>/checkpoints/` (one orbax step per saved epoch boundary):

  <E>/state/   the `TrainState` after E completed epochs (`StandardSave`): step, epoch, policy
               params + AdamW state, critic params + AdamW state, normaliser buffers,
               reset_count, and the root key as raw key data (uint32 (2,) for threefry).
  <E>/meta/    JSON: the config, epoch, step, key impl, format version, and one checksum per
               state leaf (`fingerprint`), compared after every restore. No host-side state is
               needed: every key folds (seed, stream, epoch, step) into the root key and the
               prompt sampler is `np.random.default_rng([seed, epoch])`.

The step number E is `state.epoch`, the number of completed epochs, so resuming from E runs
epoch index E next. Saves are atomic (orbax writes `<E>.orbax-checkpoint-tmp*` and renames it
once complete), so a process killed mid-save leaves the previous step as the latest one; stale
temporary directories are removed when the next manager opens the directory.

A checkpoint that cannot be read back (a truncated or zeroed data file, garbage JSON metadata,
leaves whose checksum differs from the one saved) raises `CheckpointError`, one line naming the
step directory and the file or array; `restore_latest` then falls back to the previous checkpoint
(with a warning) and moves the unreadable one aside as `<E>.corrupt` so the run can save step E
again.

One run per workdir: `workdir_lock` holds an exclusive lock on `<workdir>/.run.lock` while a run
trains, so a second run started on the same workdir stops with an error instead of interleaving
its metrics and checkpoints with the first one's. A non-local workdir (`gs://...`, any path
`etils.epath` reaches; orbax writes the arrays through tensorstore's own driver) has no file locks:
it is not locked, and the run logs one line saying so: only one run may use it, and orbax's
atomic commits (`commit_success.txt` on gs://) keep each checkpoint whole.
"""
import contextlib
import fcntl
import fnmatch
import json
import logging as python_logging
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from tdpo_jax import paths

CHECKPOINT_SUBDIR = "checkpoints"
FORMAT_VERSION = 1
# Config keys (fnmatch patterns on dotted paths) that may differ between a run and its resume;
# the mesh and sharding rules may change too (orbax reshards the state on restore).
RESUMABLE_KEY_PATTERNS = ("num_epochs", "log.*", "eval.*", "checkpoint.*", "reward_modules",
                          "pretrained.cache_dir", "mesh", "num_devices", "sharding.*")
# Config keys added after checkpoints were written without them, each with the value that
# reproduces the behaviour from before it existed: a saved config that lacks the key is read as
# holding that value, so such a checkpoint still resumes under a config that keeps it.
ADDED_KEY_DEFAULTS = {
    "critic.tower": "image_encoder",
    "critic.late_fraction": 0.3,
    "stats.per_prompt": True,
    "sample.group_size": 0,
    "pretrained.tiny": None,
}
# Config keys removed after checkpoints were written with them, which nothing ever read: a saved
# config holding one still resumes.
REMOVED_KEYS = ("pretrained.revision",)


class CheckpointError(ValueError):
  """A checkpoint that cannot be read back, or a save that failed (one line naming the path)."""


class _DropOrbaxInfo(python_logging.Filter):
  """Hides orbax's INFO lines (about 30 per save); its warnings and errors still show, as one line
  each: the tracebacks of its background threads are dropped (the run reports the cause itself,
  in one line: `CheckpointError`)."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < python_logging.WARNING:
      return False
    record.exc_info, record.exc_text = None, None
    return True


def quiet_orbax_logging():
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


def checkpoint_dir(workdir):
  """`<workdir>/checkpoints`, absolute for a local workdir; a `gs://...` one is kept as is."""
  if paths.is_local(workdir):
    workdir = os.path.abspath(workdir)
  return os.path.join(workdir, CHECKPOINT_SUBDIR)


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
  """(step, meta) of the latest finalized checkpoint in `workdir` whose meta reads, or
  (None, None). An unreadable one is skipped with a warning (`restore` falls back the same way).

  Reads only; creates nothing (safe before the config has been checked).
  """
  if not paths.is_dir(checkpoint_dir(workdir)):
    return None, None
  manager = make_manager(workdir, async_save=False, create=False)
  try:
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        return step, restore_meta(manager, step)
      except CheckpointError as error:
        logging.warning("%s; looking at the previous checkpoint", error)
    return None, None
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


def _leaf_fingerprint(leaf):
  """Two uint32 sums over the leaf's bits: plain, and weighted by a hash of the element's index
  (so a moved or zeroed element changes it). Wrapping uint32 sums are exact and independent of
  the reduction order, so the value is the same on any mesh and after any reshard."""
  bits = leaf
  if bits.dtype.itemsize == 8:
    bits = jax.lax.bitcast_convert_type(bits, jnp.uint32)  # (..., 2)
  elif bits.dtype == jnp.bool_:
    bits = bits.astype(jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[bits.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(bits, unsigned)
  bits = bits.astype(jnp.uint32)
  index = jnp.zeros(bits.shape, jnp.uint32)
  for axis in range(bits.ndim):
    index = index * jnp.uint32(bits.shape[axis]) + jax.lax.broadcasted_iota(
        jnp.uint32, bits.shape, axis)
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplicative hash, odd
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weight, dtype=jnp.uint32)])


_jit_fingerprints = jax.jit(lambda leaves: [_leaf_fingerprint(leaf) for leaf in leaves])


def fingerprint(storable_state):
  """{leaf path: [sum, weighted sum]} of a storable state (`to_storable`): the checksums saved in
  the meta and compared after a restore."""
  leaf_paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(storable_state)[0])
  sums = jax.device_get(_jit_fingerprints(list(leaves)))
  return {jax.tree_util.keystr(path): [int(v) for v in np.asarray(s)]
          for path, s in zip(leaf_paths, sums)}


def save(manager, state, config):
  """Saves `state` under step `state.epoch`, after waiting for the previous save.

  With an async manager this returns once the arrays are copied to the host (orbax's default
  synchronous device-to-host transfer), so the caller may donate them; the write continues in
  the background until `manager.wait_until_finished()`. A previous save that failed raises
  `CheckpointError` here (`wait_for_saves`).
  """
  epoch = int(state.epoch)
  wait_for_saves(manager)
  meta = {"format_version": FORMAT_VERSION, "epoch": epoch, "step": int(state.step),
          "key_impl": str(jax.random.key_impl(state.rng)), "config": config_to_dict(config),
          "checksums": fingerprint(to_storable(state))}
  manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(to_storable(state)),
                                              meta=ocp.args.JsonSave(meta)), force=True)
  logging.info("checkpoint %d (the state after epoch %d): saving to %s", epoch, epoch - 1,
               manager.directory)


def wait_for_saves(manager):
  """Waits for the background save; raises `CheckpointError` if it failed.

  Orbax only logs a failed async write (its finalize thread swallows the error, and the step is
  never committed); `check_for_errors` raises it again in the calling thread, once.
  """
  try:
    manager.wait_until_finished()  # raises when the finalize thread itself failed
    manager.check_for_errors()  # raises what the finalize thread only logged
  except Exception as error:  # pylint: disable=broad-except
    raise CheckpointError(f"saving a checkpoint in {manager.directory} failed: "
                          f"{_cause_line(error)}") from error


# The JSON files of a step directory (orbax's layout), probed to name the one that is unreadable.
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/_sharding",
               "state/array_metadatas/process_*")


def _cause_line(error):
  """The most specific one-line message in `error`'s chain (orbax wraps tensorstore's)."""
  messages = []
  while error is not None and len(messages) < 20:
    text = str(error).strip()
    if text and not isinstance(error, StopIteration):
      messages.append(f"{type(error).__name__}: {text}" if isinstance(error, (
          json.JSONDecodeError, KeyError)) else text)
    error = error.__cause__ or error.__context__
  specific = [m for m in messages if "Error reading" in m] or messages[-1:] or ["unknown error"]
  return specific[0].splitlines()[0][:500]


def _bad_json_file(step_dir):
  """The first of the step's JSON files that does not parse, or None."""
  for pattern in _JSON_FILES:
    try:
      found = paths.glob(step_dir, pattern)
    except OSError:
      found = []
    for path in found:
      try:
        json.loads(paths.read_text(path))
      except (OSError, ValueError):
        return path
  return None


def describe_failure(manager, step, error):
  """One line: the step directory, the file (or array) that failed, and the cause."""
  step_dir = os.path.join(str(manager.directory), str(step))
  bad = _bad_json_file(step_dir)
  where = f"file {bad}" if bad else f"directory {step_dir}"
  return f"checkpoint {step} is unreadable ({where}): {_cause_line(error)}"


def restore_meta(manager, step):
  """The JSON meta saved with `step` (a dict with `config`, `epoch`, `step`, `key_impl`).

  Raises:
    CheckpointError: one line naming the step directory and the unreadable file.
  """
  try:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise CheckpointError(describe_failure(manager, step, error)) from error


def restore(manager, step, template):
  """Restores the `TrainState` saved at `step` and verifies it against the saved checksums.

  Args:
    manager: from `make_manager`.
    step: a finalized step (`manager.latest_step()`).
    template: a `TrainState` of arrays or of `jax.ShapeDtypeStruct`s (rng a typed key) giving
      the tree structure, shapes, dtypes and shardings of the result.

  Returns:
    (state, meta): the restored `TrainState` with a typed key, and the JSON meta.

  Raises:
    CheckpointError: one line naming the step directory and the unreadable file, or the leaves
      whose checksum differs from the one saved.
  """
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(template)), meta=ocp.args.JsonRestore()))
  except Exception as error:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise CheckpointError(describe_failure(manager, step, error)) from error
  meta = restored["meta"]
  saved = meta.get("checksums")  # None: written before checksums existed
  if saved is not None:
    now = fingerprint(restored["state"])
    bad = sorted(path for path in set(saved) | set(now) if saved.get(path) != now.get(path))
    if bad:
      state_dir = os.path.join(str(manager.directory), str(step), "state")
      listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
      raise CheckpointError(
          f"checkpoint {step} is corrupt (directory {state_dir}): the checksum of {len(bad)} of "
          f"{len(now)} arrays differs from the one saved ({listed})")
  return from_storable(restored["state"], meta["key_impl"]), meta


def set_aside(manager, step):
  """Moves an unreadable step directory to `<step>.corrupt` (process 0; kept for inspection, no
  longer a step to orbax) and reloads the manager's step list."""
  if jax.process_index() == 0:
    step_dir = os.path.join(str(manager.directory), str(step))
    target = step_dir + ".corrupt"
    suffix = 1
    while paths.exists(target):
      target, suffix = f"{step_dir}.corrupt{suffix}", suffix + 1
    if paths.is_local(step_dir):
      os.rename(step_dir, target)
    else:  # an object store renames a folder object by object (epath's backend)
      paths.as_path(step_dir).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"tdpo_jax.checkpoint.set_aside {step}")
  manager.reload()


def readable_steps(manager):
  """The manager's steps, newest first."""
  return sorted(manager.all_steps(), reverse=True)


def enforce_max_to_keep(manager, max_to_keep):
  """Deletes the oldest steps beyond `max_to_keep` (a run killed between orbax's final rename
  and its garbage collection leaves one too many); <= 0 keeps all."""
  if max_to_keep and max_to_keep > 0:
    for step in sorted(manager.all_steps())[:-max_to_keep]:
      manager.delete(step)


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
    default there; the saved `REMOVED_KEYS` are not compared.
  """
  saved, current = flatten(saved), flatten(current)
  saved = {k: v for k, v in saved.items() if k not in REMOVED_KEYS}
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


def unlocked_message(workdir):
  """The one line logged for a workdir without file locks."""
  return (f"workdir {workdir} is not locked (no file locks on {workdir.split('://')[0]}://): "
          "only one run may use it at a time (a second one would interleave its metrics with "
          "this one's); orbax's atomic checkpoint commits keep each checkpoint whole")


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds an exclusive, non-blocking lock on `<workdir>/.run.lock` (created if needed).

  The OS drops the lock when its holder exits, however it exits, so a killed run leaves no stale
  lock. Raises ValueError naming the workdir if another process (or another open run in this
  one) holds it.

  A non-local workdir (`gs://...`) has no file locks: nothing is locked or created, and one
  warning line (`unlocked_message`) says what protects it.
  """
  if not paths.is_local(workdir):
    logging.warning("%s", unlocked_message(workdir))
    yield
    return
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
