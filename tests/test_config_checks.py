"""The one up-front config check (tdpo_jax/config_checks.py): pure, no model, no JAX needed.

- Every numeric key out of range is a one-line ValueError naming the key and its value.
- The shipped configs pass; the choice lists agree with the heavy modules that use them.
- The module imports no jax / flax / transformers (main.py checks the config before them).
- A workdir that is a file, below a file, or not writable is named before anything is written.
"""
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from tdpo_jax import config_checks
from tests import helpers

BAD_VALUES = [
    ("num_epochs", 0, "num_epochs=0 must be >= 1"),
    ("num_epochs", -3, "num_epochs=-3 must be >= 1"),
    ("num_devices", 0, "num_devices=0 must be -1"),
    ("sample.num_steps", 0, "sample.num_steps=0 must be >= 1"),
    ("sample.eta", 1.5, r"sample.eta=1.5 must be in \(0.0, 1.0\]"),
    ("sample.eta", -0.1, r"sample.eta=-0.1 must be in \(0.0, 1.0\]"),
    ("sample.eta", 0.0, r"sample.eta=0.0 must be in \(0.0, 1.0\]"),
    ("sample.guidance_scale", math.inf, "sample.guidance_scale=inf must be finite"),
    ("sample.batch_size", 0, "sample.batch_size=0 must be >= 1"),
    ("sample.batch_size", -4, "sample.batch_size=-4 must be >= 1"),
    ("sample.num_batches_per_epoch", 0, "sample.num_batches_per_epoch=0 must be >= 1"),
    ("sample.group_size", -1, "sample.group_size=-1 must be >= 0"),
    ("sample.height", 0, "sample.height=0 must be >= 1"),
    ("train.batch_size", 0, "train.batch_size=0 must be >= 1"),
    ("train.batch_size", -2, "train.batch_size=-2 must be >= 1"),
    ("train.gradient_accumulation_steps", 0, "train.gradient_accumulation_steps=0 must be >= 1"),
    ("train.timestep_fraction", 0.0, r"train.timestep_fraction=0.0 must be in \(0, 1\]"),
    ("train.learning_rate", -1e-4, "train.learning_rate=-0.0001 must be > 0"),
    ("train.learning_rate", 0.0, "train.learning_rate=0.0 must be > 0"),
    ("train.learning_rate", math.nan, "train.learning_rate=nan must be finite"),
    ("train.critic_learning_rate", -1.0, "train.critic_learning_rate=-1.0 must be > 0"),
    ("train.critic_learning_rate", math.inf, "train.critic_learning_rate=inf must be finite"),
    ("train.adam_beta1", 1.0, r"train.adam_beta1=1.0 must be in \[0, 1\)"),
    ("train.adam_beta2", -0.5, r"train.adam_beta2=-0.5 must be in \[0, 1\)"),
    ("train.adam_weight_decay", -1e-4, "train.adam_weight_decay=-0.0001 must be >= 0"),
    ("train.adam_epsilon", -1e-8, "train.adam_epsilon=-1e-08 must be >= 0"),
    ("train.max_grad_norm", 0.0, "train.max_grad_norm=0.0 must be > 0"),
    ("train.clip_range", -0.1, "train.clip_range=-0.1 must be > 0"),
    ("train.clip_range", math.nan, "train.clip_range=nan must be finite"),
    ("train.value_clip_range", 0.0, "train.value_clip_range=0.0 must be > 0"),
    ("train.value_coef", -1.0, "train.value_coef=-1.0 must be >= 0"),
    ("train.kl_coef", -0.1, "train.kl_coef=-0.1 must be >= 0"),
    ("train.adv_eps", -1.0, "train.adv_eps=-1.0 must be >= 0"),
    ("lora.rank", 0, "lora.rank=0 must be >= 1"),
    ("critic.hidden_sizes", (16, 0), r"critic.hidden_sizes=\(16, 0\) must be"),
    ("critic.dropout_rates", (0.1,), r"critic.dropout_rates=\(0.1,\) must hold one rate"),
    ("critic.dropout_rates", (0.2, 0.2, 1.0, 0.0), r"one rate in \[0, 1\) per hidden layer"),
    ("critic.init_std", -0.5, "critic.init_std=-0.5 must be >= 0"),
    ("critic.embed_chunk_size", -1, "critic.embed_chunk_size=-1 must be >= 0"),
    ("critic.embed_branches", 0, "critic.embed_branches=0 must be >= 1"),
    ("critic.late_fraction", 1.5, r"critic.late_fraction=1.5 must be in \(0, 1\]"),
    ("stats.buffer_size", 0, "stats.buffer_size=0 must be >= 1"),
    ("stats.min_count", 33, "stats.min_count=33 must be <= stats.buffer_size=32"),
    ("stats.min_count", -1, "stats.min_count=-1 must be >= 0"),
    ("stats.eps", -1e-6, "stats.eps=-1e-06 must be >= 0"),
    ("reset.period", 0, "reset.period=0 must be >= 1"),
    ("reset.tau", -0.1, "reset.tau=-0.1 must be >= 0"),
    ("reset.tau", math.nan, "reset.tau=nan must be finite"),
    ("reset.probe_size", 0, "reset.probe_size=0 must be >= 1"),
    ("checkpoint.every_epochs", -1, "checkpoint.every_epochs=-1 must be >= 0"),
    ("checkpoint.max_to_keep", -1, "checkpoint.max_to_keep=-1 must be >= 0"),
    ("log.image_grid_every", -1, "log.image_grid_every=-1 must be >= 0"),
    ("log.num_grid_images", 0, "log.num_grid_images=0 must be >= 1 when log.image_grid_every"),
    ("eval.every", -1, "eval.every=-1 must be >= 0"),
    ("eval.num_prompts", -1, "eval.num_prompts=-1 must be >= 0"),
    ("algorithm", "ppo", "unknown algorithm 'ppo'"),
    ("train.kl_mode", "kl", "unknown train.kl_mode 'kl'"),
    ("reset.target", "all", "unknown reset.target 'all'"),
    ("precision.policy", "float16", "unknown precision.policy 'float16'"),
    ("train.remat", "all", "unknown train.remat 'all'"),
    ("critic.tower", "vit", "unknown critic.tower 'vit'"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_out_of_range_value_is_named_in_one_line(key, value, message):
  config = helpers.tiny_config("", **{key: value})
  with pytest.raises(ValueError, match=message) as raised:
    config_checks.validate_config(config)
  assert "\n" not in str(raised.value)


def test_a_number_of_the_wrong_type_is_named():
  # A config built without ConfigDict's type safety (e.g. from a dict) may hold any type.
  config = ml_collections.ConfigDict(helpers.tiny_config("").to_dict(), type_safe=False)
  config.sample.num_steps = 2.5
  with pytest.raises(ValueError, match=r"sample.num_steps=2.5 must be an integer"):
    config_checks.validate_config(config)
  config = ml_collections.ConfigDict(helpers.tiny_config("").to_dict(), type_safe=False)
  config.train.learning_rate = "1e-4"
  with pytest.raises(ValueError, match=r"train.learning_rate='1e-4' must be a number"):
    config_checks.validate_config(config)


def test_a_missing_key_is_named():
  config = helpers.tiny_config("")
  del config.sample["eta"]
  with pytest.raises(ValueError, match=r"the config has no key 'sample.eta'"):
    config_checks.validate_config(config)


@pytest.mark.parametrize("name,arg", [
    ("tiny", None), ("shapes", None), ("shapes", "algorithm=grpo"), ("shapes", "reward=proxy"),
    ("sd15", None), ("sd15", "algorithm=ddpo,reward=hpsv2"),
])
def test_shipped_configs_pass(name, arg):
  config_checks.validate_config(helpers.load_config(name, arg))


def test_ranges_checked_before_reward_names_and_batches():
  # Cheap checks answer first: a range error wins over an unknown reward and a bad split.
  config = helpers.tiny_config("", reward="no_such_reward", num_epochs=0,
                               **{"train.batch_size": 3})
  with pytest.raises(ValueError, match="num_epochs=0"):
    config_checks.validate_config(config)


def test_choice_lists_agree_with_the_modules_that_use_them():
  from tdpo_jax import critic_tower  # pylint: disable=import-outside-toplevel
  from tdpo_jax import train  # pylint: disable=import-outside-toplevel
  from tdpo_jax import train_step  # pylint: disable=import-outside-toplevel
  from tdpo_jax.models import pipeline  # pylint: disable=import-outside-toplevel
  assert sorted(pipeline.PRECISIONS) == sorted(config_checks.PRECISIONS)
  assert train_step.REMAT_MODES == config_checks.REMAT_MODES
  assert critic_tower.TOWERS == config_checks.CRITIC_TOWERS
  assert train.ALGORITHMS is config_checks.ALGORITHMS


def test_module_imports_nothing_heavy():
  code = ("import sys; from tdpo_jax import config_checks; "
          "heavy = [m for m in ('jax', 'flax', 'transformers', 'optax', 'orbax') "
          "if m in sys.modules]; print(heavy)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=helpers.REPO, timeout=60, check=True)
  assert result.stdout.strip() == "[]"


def test_workdir_checks(tmp_path):
  (tmp_path / "afile").write_text("x")
  with pytest.raises(ValueError, match=r"workdir '.*afile' is a file, not a folder"):
    config_checks.check_workdir(str(tmp_path / "afile"))
  with pytest.raises(ValueError, match=r"cannot be created: '.*afile' is a file"):
    config_checks.check_workdir(str(tmp_path / "afile" / "run"))
  config_checks.check_workdir(str(tmp_path / "new" / "run"))  # fine, and creates nothing
  assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_read_only_workdir_is_named(tmp_path, monkeypatch):
  # As root a chmod does not stop writes; a read-only mount answers os.access with EROFS.
  monkeypatch.setattr(config_checks.os, "access", lambda path, mode: False)
  monkeypatch.setattr(config_checks, "_read_only", lambda path: True)
  with pytest.raises(ValueError, match=r"is not writable: '.*' is on a read-only filesystem"):
    config_checks.check_workdir(str(tmp_path / "run"))


def test_group_and_batch_splits():
  with pytest.raises(ValueError, match="sample.group_size=0 must be >= 2 for algorithm 'grpo'"):
    config_checks.validate_config(helpers.tiny_config("", algorithm="grpo"))
  with pytest.raises(ValueError, match="train.batch_size=3 does not divide the 8 samples"):
    config_checks.validate_config(helpers.tiny_config("", **{"train.batch_size": 3}))
  with pytest.raises(ValueError, match=r"sample.num_steps \* train.timestep_fraction = 10 \* "
                                       r"0.05 must be >= 1"):
    config_checks.validate_config(helpers.tiny_config("", **{"train.timestep_fraction": 0.05}))
