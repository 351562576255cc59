"""The device mesh, config partition rules, and batch placement (DESIGN §4, STYLE "Sharding & mesh").

Shapes: B a batch's leading (global) dim; P processes (hosts); a mesh of `data` x `fsdp` devices.

- `make_mesh(config.mesh, config.num_devices)`: a `Mesh` with named axes from
  `(("data", -1), ("fsdp", 1))`; one size may be -1 ("the rest of the devices").
- Partition rules (`config.sharding.rules`) are an ordered tuple of
  `(regex on the "/"-joined param path, spec)`; the first rule whose regex `re.search`-es the path
  wins; a path no rule matches is an error (end the rules with `(".*", ())` to replicate the rest).
  A spec is a `PartitionSpec` as a tuple (`()` replicated, `(None, "fsdp")` the 2nd dim over
  `fsdp`) or the string `"fsdp_largest"`: the largest dim divisible by the `fsdp` size is sharded
  over `fsdp` (ties: the later dim), else the leaf is replicated (ZeRO-3 style, as big_vision's
  `fsdp` rule).
- Batches shard their batch dim over `("data", "fsdp")` (`BATCH_AXES`): every device holds
  B / (data x fsdp) rows. Each process feeds only its own rows (`process_batch_slice`,
  `host_batch_to_global`).
"""
import math
import re

import jax
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
import numpy as np

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
FSDP_LARGEST = "fsdp_largest"
PATH_SEPARATOR = "/"


def path_string(path):
  """A tree path as "a/b/kernel" (dict keys, attribute names and sequence indices)."""
  return jax.tree_util.keystr(path, simple=True, separator=PATH_SEPARATOR)


# ---------------------------------------------------------------------------------------- mesh
def mesh_shape(mesh_config, device_count):
  """Resolves `(("data", -1), ("fsdp", 1))` against `device_count` devices.

  Returns:
    a dict axis name -> size whose product is `device_count`.
  """
  names = tuple(str(name) for name, _ in mesh_config)
  if names != MESH_AXES:
    raise ValueError(f"mesh axes {names} are not supported; expected {MESH_AXES}")
  sizes = [int(size) for _, size in mesh_config]
  if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f"mesh sizes {dict(zip(names, sizes))} are invalid; expected positive sizes "
                     "and at most one -1 (the rest of the devices)")
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if device_count % known:
      raise ValueError(f"mesh {dict(zip(names, sizes))} does not fit {device_count} devices: "
                       f"{device_count} is not a multiple of {known}")
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise ValueError(f"mesh {dict(zip(names, sizes))} has {math.prod(sizes)} devices but "
                     f"{device_count} devices are used (jax.device_count()={jax.device_count()})")
  return dict(zip(names, sizes))


def make_mesh(mesh_config, num_devices=-1):
  """A `Mesh` with axes ("data", "fsdp") from `config.mesh`.

  Args:
    mesh_config: `((axis, size), ...)` with the axes of `MESH_AXES`; one size may be -1.
    num_devices: -1 = every device (`jax.device_count()`); n > 0 = the first n devices
      (single-process runs only: tests and debugging on a subset).
  Returns:
    a `jax.sharding.Mesh` of shape (data, fsdp).
  """
  devices = jax.devices()
  num_devices = int(num_devices)
  if num_devices != -1:
    if num_devices < 1 or num_devices > len(devices):
      raise ValueError(f"num_devices={num_devices} is invalid; expected -1 (all) or 1 to "
                       f"{len(devices)} (jax.device_count())")
    if num_devices != len(devices) and jax.process_count() > 1:
      raise ValueError(f"num_devices={num_devices} with {jax.process_count()} processes; "
                       f"expected -1 (every device) in multi-process runs")
    devices = devices[:num_devices]
  shape = mesh_shape(mesh_config, len(devices))
  sizes = tuple(shape[name] for name in MESH_AXES)
  try:  # respects the physical topology on TPU (ICI rings); plain reshape elsewhere
    device_array = mesh_utils.create_device_mesh(sizes, devices)
  except (ValueError, AssertionError, NotImplementedError):
    device_array = np.asarray(devices).reshape(sizes)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def num_batch_devices(mesh):
  """Devices a batch is split over: data x fsdp."""
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_divides(name, batch_size, mesh):
  """Raises a ValueError naming both numbers if `batch_size` does not split over the mesh."""
  devices = num_batch_devices(mesh)
  if batch_size % devices:
    raise ValueError(
        f"{name}={batch_size} is not divisible by the {devices} batch devices of the mesh "
        f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


# -------------------------------------------------------------------------------- shardings
def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh, axis=0):
  """Dim `axis` split over ("data", "fsdp"), the other dims replicated."""
  spec = (None,) * axis + (BATCH_AXES,)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def fsdp_largest_spec(shape, fsdp_size):
  """PartitionSpec sharding the largest dim divisible by `fsdp_size` over "fsdp" (ties: later
  dim); replicated when `fsdp_size` is 1 or no dim divides."""
  if fsdp_size <= 1:
    return jax.sharding.PartitionSpec()
  candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp_size == 0]
  if not candidates:
    return jax.sharding.PartitionSpec()
  _, dim = max(candidates)
  return jax.sharding.PartitionSpec(*((None,) * dim + ("fsdp",)))


def spec_for(path, shape, rules, mesh):
  """The PartitionSpec of one leaf: the spec of the first rule whose regex matches `path`.

  Args:
    path: "/"-joined param path, e.g. "unet/down_blocks_0/resnets_0/conv1/kernel".
    shape: the leaf's shape.
    rules: ordered `((regex, spec), ...)` (module docstring).
    mesh: the `Mesh` (axis sizes for "fsdp_largest" and divisibility checks).
  """
  for pattern, spec in rules:
    if re.search(pattern, path):
      break
  else:
    raise ValueError(f"param {path!r} matches no sharding rule; expected a rule for it or a "
                     "final replicated fallback ('.*', ())")
  if isinstance(spec, str):
    if spec != FSDP_LARGEST:
      raise ValueError(f"sharding rule {pattern!r} has spec {spec!r}; expected a tuple "
                       f"PartitionSpec or {FSDP_LARGEST!r}")
    return fsdp_largest_spec(shape, mesh.shape["fsdp"])
  spec = tuple(spec)
  if len(spec) > len(shape):
    raise ValueError(f"sharding spec {spec} of rule {pattern!r} has {len(spec)} dims but param "
                     f"{path!r} has shape {tuple(shape)}")
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for axis in axes:
      if axis not in mesh.shape:
        raise ValueError(f"sharding rule {pattern!r} names mesh axis {axis!r}; expected one of "
                         f"{tuple(mesh.shape)}")
    size = math.prod(mesh.shape[axis] for axis in axes)
    if shape[dim] % size:
      raise ValueError(f"param {path!r} of shape {tuple(shape)}: dim {dim} is not divisible by "
                       f"the {size} devices of {axes} (rule {pattern!r})")
  return jax.sharding.PartitionSpec(*spec)


def tree_specs(mesh, rules, tree, prefix=""):
  """A PartitionSpec per leaf of `tree` (arrays or ShapeDtypeStructs); paths get `prefix`."""
  def leaf_spec(path, leaf):
    full = path_string(path)
    full = f"{prefix}{PATH_SEPARATOR}{full}" if prefix and full else (prefix or full)
    return spec_for(full, np.shape(leaf), rules, mesh)
  return jax.tree_util.tree_map_with_path(leaf_spec, tree)


def tree_shardings(mesh, rules, tree, prefix=""):
  """A `NamedSharding` pytree for `tree` by the partition `rules` (first match wins)."""
  return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec),
                      tree_specs(mesh, rules, tree, prefix),
                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


# ---------------------------------------------------------------------------- host <-> device
def put_tree(tree, shardings):
  """Places a tree (host data identical on every process, or jax arrays) with `shardings`.

  Args:
    tree: a pytree of host arrays or jax arrays.
    shardings: a tree of `jax.sharding.Sharding`s with the structure of `tree`.

  A leaf that lives whole on one device (a loaded model's parameters) and is to be split goes
  through the host: `device_put` would otherwise split it with a jitted slice compiled once per
  leaf shape (the tiny pipeline's frozen parameters placed on the 2 x 4 and 1 x 8 meshes of
  tests/test_sharding.py: 73 compiles, 24 s on a 2-core CPU), where NumPy slices the host copy
  without compiling anything.
  """
  def via_host(x, sharding):
    if (isinstance(x, jax.Array) and x.is_fully_addressable and len(x.sharding.device_set) == 1
        and not sharding.is_fully_replicated
        and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)):
      return np.asarray(x)
    return x
  return jax.device_put(jax.tree.map(via_host, tree, shardings), shardings)


def replicate_host(tree, mesh):
  """Host values or process-local arrays (e.g. PRNG keys derived from the root key), identical
  on every process, as arrays replicated over the whole mesh (multi-process safe: a committed
  single-device array cannot be `device_put` onto devices of other processes)."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding)
  return jax.tree.map(put, tree)


def process_batch_slice(mesh, global_batch):
  """The rows [start, stop) of a batch of `global_batch` that this process feeds.

  With several processes each holds the rows of its own devices (a contiguous block when the
  mesh is built from `jax.devices()`); with one process, all of them.
  """
  sharding = batch_sharding(mesh)
  indices = sharding.addressable_devices_indices_map((global_batch,)).values()
  bounds = sorted({(index[0].start or 0, index[0].stop or global_batch) for index in indices})
  start, stop = bounds[0][0], bounds[-1][1]
  rows = sum(b - a for a, b in bounds)
  if rows != stop - start:
    raise ValueError(f"process {jax.process_index()} owns non-contiguous batch rows {bounds}; "
                     "expected one block (build the mesh from jax.devices())")
  return start, stop


def host_batch_to_global(local_batch, mesh, global_batch, axis=0):
  """This process's rows (`process_batch_slice`) -> a global array sharded over the batch axes.

  Args:
    local_batch: host array (or pytree) whose dim `axis` holds this process's rows.
    global_batch: the global size of dim `axis`.
  """
  sharding = batch_sharding(mesh, axis)

  def to_global(x):
    x = np.asarray(x)
    shape = x.shape[:axis] + (global_batch,) + x.shape[axis + 1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(to_global, local_batch)


def to_host(x):
  """The full value of a (possibly multi-host) array as NumPy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
