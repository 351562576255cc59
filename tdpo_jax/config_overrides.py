"""`KEY=VALUE` overrides of a ConfigDict from the command line (`--set a.b=value`).

Used by the scripts that take `--set` (the shapes pre-training, the overoptimisation benchmark);
`python -m tdpo_jax.main` uses ml_collections' own `--config.a.b=value` flags instead.
"""
import ast


def apply(config, item, allow_strings=True):
  """Sets `config.a.b = value` from `item` = "a.b=value", in place.

  VALUE is parsed as a Python literal (`10`, `1e-3`, `(0.0, 0.0)`, `'text'`, `False`); with
  `allow_strings`, anything else is taken as a string (`prompts=/data/my_prompts.txt`).
  The entry must already exist: a typo is an error, not a new key. ConfigDict's own type check
  applies (an int may go into a float entry, a string may not go into a number).

  Raises:
    ValueError: one line naming the item and what is expected.
  """
  key, sep, text = item.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. sample.num_steps=10")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if not allow_strings:
      raise ValueError(f"--set {item!r}: {text!r} is not a Python literal (a number, tuple, "
                       "quoted string, True/False)") from None
    value = text
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    if name not in node or not hasattr(node[name], "keys"):
      raise ValueError(f"--set {item!r}: no config entry {key!r}")
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set {item!r}: no config entry {key!r}")
  try:
    node[leaf] = value
  except TypeError as error:
    raise ValueError(f"--set {item!r}: {error}") from None
