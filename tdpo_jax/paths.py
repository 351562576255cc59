"""Workdir file access: a local folder or any path `etils.epath` reaches (orbax's own path type):
`gs://bucket/run` (what launch/README.md recommends on TPU pods), `s3://`, `az://`, `hf://`.

Every file a run writes or reads in its workdir (metrics.jsonl, config.json, image grids, eval
tables, plots, checkpoint metadata) goes through these helpers or `etils.epath.Path`, never
through `open` / `os.makedirs` on a string, which would turn `gs://b/run` into a local folder
named `gs:`. Paths stay strings (`os.path.join` joins `gs://` paths correctly on POSIX).

Local paths behave exactly as before: atomic writes through a temporary file and `os.replace`.
On an object store there is no rename, but an object appears whole when its upload completes, so
a plain write is already atomic there; appending is emulated by rewriting the (small) object.

A non-local workdir needs the filesystem packages of epath (`gcsfs` for gs://, or TensorFlow)
and, for orbax's checkpoint manager on gs://, `google-cloud-storage` (README.md).
"""
import contextlib
import os
import shutil
import tempfile

# The URI schemes epath serves through a non-local backend (etils.epath.gpath._URI_PREFIXES).
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")


def is_local(path):
  """Whether `path` is a local filesystem path (no `gs://`-like scheme)."""
  return not os.fspath(path).startswith(REMOTE_PREFIXES)


def as_path(path):
  """`path` as an `etils.epath.Path` (orbax's path type)."""
  from etils import epath  # pylint: disable=g-import-not-at-top  (config_checks stays light)
  return epath.Path(os.fspath(path))


def exists(path):
  return as_path(path).exists()


def is_dir(path):
  return as_path(path).is_dir()


def makedirs(path):
  """Creates the folder and its parents if needed (on an object store: at most a marker)."""
  as_path(path).mkdir(parents=True, exist_ok=True)


def read_text(path):
  return as_path(path).read_text()


def read_bytes(path):
  return as_path(path).read_bytes()


def write_bytes(path, data):
  """Writes `data` to `path` (not atomic locally; an object store commits an object whole)."""
  as_path(path).write_bytes(data)


def write_text(path, text):
  """Writes `text` as UTF-8 bytes (no newline translation: csv's `\\r\\n` stays)."""
  write_bytes(path, text.encode("utf-8"))


def write_atomic(path, text, temp=None):
  """Writes `text` so that a kill never leaves a half file at `path`.

  Locally through the temporary file `temp` (default `<path>.tmp`) renamed over `path`; on an
  object store by one upload (an object appears only once complete).
  """
  if is_local(path):
    temp = temp or f"{path}.tmp"
    with open(temp, "w") as file:
      file.write(text)
    os.replace(temp, path)
  else:
    write_text(path, text)


def remove(path):
  as_path(path).unlink()


def glob(directory, pattern):
  """Sorted paths (strings) under `directory` matching `pattern` (may hold `/`, not `**`)."""
  return sorted(os.fspath(p) for p in as_path(directory).glob(pattern))


@contextlib.contextmanager
def local_target(path):
  """Yields a local file name to write `path`'s content to (a library that only writes local
  files: PIL, matplotlib).

  A local `path` is yielded as is. For a non-local one the name is in a fresh temporary folder
  (same base name, so the format is still inferred from the extension); when the block ends
  without an error the file is uploaded to `path` and the folder removed.
  """
  if is_local(path):
    yield os.fspath(path)
    return
  folder = tempfile.mkdtemp(prefix="tdpo_jax_upload_")
  try:
    local = os.path.join(folder, os.path.basename(os.fspath(path)) or "file")
    yield local
    with open(local, "rb") as file:
      write_bytes(path, file.read())
  finally:
    shutil.rmtree(folder, ignore_errors=True)
