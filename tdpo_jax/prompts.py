"""Prompt sets: the shipped lists in `tdpo_jax/prompts/*.txt`, or any text file of prompts.

A prompt set is a tuple of strings; training samples prompts by index into it, so the
per-prompt reward normaliser (`stats.py`) can key its buffers by that index.
"""
import os

import numpy as np

PROMPT_DIR = os.path.join(os.path.dirname(__file__), "prompts")


def available_prompt_sets():
  """Names of the prompt sets shipped with the package, e.g. `simple_animals`."""
  return sorted(f[:-4] for f in os.listdir(PROMPT_DIR) if f.endswith(".txt"))


def load_prompts(name_or_path):
  """Loads a shipped prompt set by name, or a text file with one prompt per line.

  Blank lines and lines starting with `#` are skipped. Raises ValueError for an unknown
  set name or an empty file.
  """
  if os.path.isfile(name_or_path):
    path = name_or_path
  elif os.path.isfile(os.path.join(PROMPT_DIR, f"{name_or_path}.txt")):
    path = os.path.join(PROMPT_DIR, f"{name_or_path}.txt")
  else:
    raise ValueError(
        f"unknown prompt set {name_or_path!r}: expected a file path or one of "
        f"{available_prompt_sets()}")
  with open(path, encoding="utf-8") as f:
    prompts = tuple(line.strip() for line in f if line.strip() and not line.startswith("#"))
  if not prompts:
    raise ValueError(f"prompt file {path!r} is empty: expected one prompt per line")
  return prompts


def grouped_prompt_indices(rng, num_prompts, total, group_size):
  """`total` prompt indices in consecutive groups of `group_size` copies of one prompt (GRPO).

  The total / group_size prompts are drawn uniformly with replacement.

  Args:
    rng: a `np.random.Generator`.
  Returns:
    int32 array (total,): [p_0] * G + [p_1] * G + ...
  """
  if group_size < 1 or total % group_size:
    raise ValueError(f"group_size={group_size} does not divide {total} samples")
  return np.repeat(sample_prompt_indices(rng, num_prompts, total // group_size), group_size)


def sample_prompt_indices(rng, num_prompts, batch_size):
  """Draws `batch_size` prompt indices uniformly with replacement (as DDPO / TDPO do).

  Args:
    rng: a `np.random.Generator` (host side: prompts are strings).
  Returns:
    int32 array (batch_size,).
  """
  return rng.integers(0, num_prompts, size=batch_size).astype(np.int32)
