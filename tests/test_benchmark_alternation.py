"""benchmarks/alternation.py: versions timed call by call in turn, medians of their own calls;
and `cli.parse_flags_only`, the benchmarks' flag parsing."""
import pytest

from tdpo_jax import cli
from tests import helpers


def test_versions_alternate_and_each_median_is_of_its_own_calls():
  alternation = helpers.load_script("benchmarks/alternation.py", "alternation")
  events, now = [], [0.0]

  def clock():
    return now[0]

  def version(name, durations):
    durations = iter(durations)

    def prepare():
      events.append(("prepare", name))
      return (name,)

    def run(arg):
      assert arg == name  # run receives what prepare made
      events.append(("run", name))
      now[0] += next(durations)
      return arg

    return prepare, run

  median = alternation.median_seconds(
      {"a": version("a", [1.0, 5.0, 2.0]), "b": version("b", [10.0, 30.0, 20.0])}, repeats=3,
      clock=clock)
  assert median == {"a": 2.0, "b": 20.0}
  assert events == [(kind, name) for _ in range(3) for name in "ab"
                    for kind in ("prepare", "run")]
  with pytest.raises(ValueError, match="repeats=0"):
    alternation.median_seconds({"a": version("a", [])}, repeats=0)


def _define(flag_values, argv):
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_integer("repeats", 3, "Repeats.", lower_bound=1, flag_values=flag_values)


def test_parse_flags_only_returns_the_flags_and_rejects_a_positional_argument():
  assert cli.parse_flags_only(["--repeats=5"], _define, "prog")["repeats"].value == 5
  with pytest.raises(SystemExit, match=r"^error: unexpected argument 'extra'; expected only "
                     r"flags$"):
    cli.parse_flags_only(["--repeats=5", "extra"], _define, "prog")
