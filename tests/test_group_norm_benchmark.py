"""benchmarks/group_norm.py: both decodes run in one process and agree to float rounding."""
import re

import pytest

from tests import helpers


def test_prints_both_timings_the_ratio_and_a_rounding_sized_difference(cache_dir, capsys):
  script = helpers.load_script("benchmarks/group_norm.py", "group_norm_benchmark")
  script.main([f"--config.pretrained.cache_dir={cache_dir}", "--latents=2", "--repeats=1"])
  out = capsys.readouterr().out
  seconds = {name: float(re.search(rf"{name}\s+([0-9.]+) s", out).group(1))
             for name in ("flax.linen.GroupNorm", "unet.GroupNorm")}
  ratio = float(re.search(r"ratio ours / flax\s+([0-9.]+)", out).group(1))
  # The ratio of the unrounded medians: within the printed (3-decimal) seconds' rounding.
  ours, theirs, half = seconds["unet.GroupNorm"], seconds["flax.linen.GroupNorm"], 5e-4
  assert (ours - half) / (theirs + half) - 0.005 <= ratio <= (ours + half) / (theirs - half) + 0.005
  # Same math: the decoded images differ by float32 rounding only (images lie in [0, 1]).
  assert float(re.search(r"max \|image difference\| (\S+)", out).group(1)) < 1e-4
  # The swap is undone: the models use our GroupNorm afterwards.
  from tdpo_jax.models import unet  # pylint: disable=import-outside-toplevel
  assert unet.group_norm(4, 1e-6, None, "n").__class__ is unet.GroupNorm


def test_bad_flag_is_a_one_line_error():
  script = helpers.load_script("benchmarks/group_norm.py", "group_norm_benchmark")
  with pytest.raises(SystemExit, match=r"^error: flag --repeats=0: 0 is not a positive integer$"):
    script.main(["--repeats=0"])
