"""A/B timing for the benchmarks: versions of one computation timed in alternation.

This machine's speed drifts by up to 2x within hours, so a benchmark that compares two versions
times them in ONE process, call by call in turn (A, B, A, B, ...), and prints the ratio of their
medians: both medians then see the same machine state.

The scripts import this module by name (`python benchmarks/x.py` puts benchmarks/ on sys.path;
tests/helpers.load_script does the same while it loads a script).
"""
import statistics
import time


def median_seconds(versions, repeats, clock=time.perf_counter):
  """{name: median seconds of `run(*prepare())`} over `repeats` rounds, each round calling every
  version once, in the dict's order.

  Args:
    versions: {name: (prepare, run)}: `prepare()` returns the arguments of one call and is not
      timed (e.g. a fresh state for a kernel that donates its state); `run(*args)` is timed up to
      `jax.block_until_ready` of its result. Warm up (compile) each `run` before.
    repeats: rounds (>= 1).
    clock: seconds now (a fake one in tests).
  """
  import jax  # noqa: PLC0415  (scripts import JAX only after their flags parsed)
  if repeats < 1:
    raise ValueError(f"repeats={repeats}; expected >= 1")
  seconds = {name: [] for name in versions}
  for _ in range(repeats):
    for name, (prepare, run) in versions.items():
      args = prepare()
      start = clock()
      jax.block_until_ready(run(*args))
      seconds[name].append(clock() - start)
  return {name: statistics.median(s) for name, s in seconds.items()}
