"""Test setup: 8 fake CPU devices, set before JAX initialises its backend (STYLE §2 Tests)."""
import os
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by the xdist workers and the subprocesses the tests
# start: many tests build a fresh `Trainer` of the same tiny shapes, whose kernels can then load
# instead of compiling again (compilation is most of a tiny test's time; test_checkpoint.py took
# 295 s with an empty cache, 205-215 s with a warm one). Entries are keyed by the HLO and the
# JAX/XLA versions, so a stale one is never used.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"tdpo_jax_tests_xla_cache_{os.getuid()}"))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "multiprocess: spawns jax.distributed processes; the README's test command "
      "runs these alone, after the xdist part (XLA:CPU's gloo collectives time out after 30 s "
      "when a starved process lags)")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """The tiny models' cache folder, one per test process: tests that build the same config
  then share one Trainer (`helpers.shared_trainer`) across test files."""
  return tmp_path_factory.mktemp("models")
