"""The command line of every script: absl flags, and a config as ml_collections config flags.

One dialect (the main job's): `--name=value` flags, and where a script runs from a config,
`--config=FILE[:ARG]` (a config file, `get_config(ARG)`; `configs/*.py` or
`tdpo_jax/configs/*.py`) with `--config.a.b=value` overrides of entries the config declares.

`parse` defines the flags on a FRESH `FlagValues` and parses `argv` into it, so a script's
`main(argv)` runs in-process any number of times (tests) and beside another script that defines
`--config` too; a bad flag, config file or override is a one-line `SystemExit("error: ...")`.
"""
import sys

from absl import flags
from ml_collections import config_flags


def define_config(flag_values, argv, default=None, help_string="A config file[:ARG]."):
  """`--config` (and its `--config.a.b=value` overrides) on `flag_values`, read from `argv`."""
  return config_flags.DEFINE_config_file("config", default, help_string, flag_values=flag_values,
                                         sys_argv=argv, lock_config=True)


def parse(argv, define, program=None):
  """Parses the flags `define(flag_values, full_argv)` defines.

  Args:
    argv: the arguments WITHOUT the program name (None: `sys.argv[1:]`).
    define: defines the flags on the FlagValues it is given (`define_config` for `--config`).
    program: the name `--help` shows (default: sys.argv[0]).

  Returns:
    (flag_values, positional arguments).
  """
  full = [program or sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  try:
    define(flag_values, full)  # a --config default is loaded (and overridden) here
    if "--help" in full[1:] or "-h" in full[1:] or "--helpfull" in full[1:]:
      print(flag_values.get_help(), flush=True)
      raise SystemExit(0)
    positional = flag_values(full)[1:]
    if "config" in flag_values:
      flag_values["config"].value.keys()  # a config file that failed to load raises here
  except SystemExit:
    raise
  except Exception as error:  # noqa: BLE001  (absl / ml_collections / the config file's own)
    raise SystemExit(f"error: {error_line(error, full)}") from None
  return flag_values, positional


def parse_flags_only(argv, define, program=None):
  """`parse` for a script that takes flags and no positional argument: the flag values, or a
  one-line `SystemExit` naming the first positional argument."""
  flag_values, positional = parse(argv, define, program)
  if positional:
    raise SystemExit(f"error: unexpected argument {positional[0]!r}; expected only flags")
  return flag_values


def override_values(flag_values):
  """The `--config.a.b=value` overrides as {"a.b": value} (values parsed by the config's types)."""
  return dict(config_flags.get_override_values(flag_values["config"]))


def config_argument(flag_values):
  """The `ARG` of `--config=FILE:ARG` ("" without one) and the FILE."""
  path, _, arg = flag_values["config"].config_filename.partition(":")
  return arg, path


def one_line(text):
  """`text` (an error's message) with its whitespace runs, newlines included, as single spaces."""
  return " ".join(str(text).split())


def error_line(error, argv):
  """One line for an error raised while the flags (and the config file) are parsed.

  ml_collections loads the config file and applies the `--config.a.b=` overrides while absl
  parses the flags, and wraps a config file's own error (with its traceback as text).
  """
  if isinstance(error, SyntaxError):
    return (f"syntax error in the config file {error.filename}, line {error.lineno}: "
            f"{error.msg}")
  if isinstance(error, (KeyError, AttributeError)):  # an override of an undeclared key
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    key = str(error.args[0]).strip("'\"") if error.args else ""
    named = [o for o in overrides if key in o[len("--config."):].split(".")] or overrides
    return (f"unknown config key in {', '.join(named)}: the config has no entry {key!r} "
            "(every key is declared in the config file)")
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if isinstance(error, OSError) and lines:  # config file not found / unreadable
    return f"cannot load the config file: {lines[-1]}"
  innermost = error
  while innermost.__cause__ is not None or (
      innermost.__context__ is not None and not isinstance(innermost.__context__, StopIteration)):
    innermost = innermost.__cause__ or innermost.__context__
  if len(lines) > 1 and innermost is not error:
    prefix = "" if isinstance(innermost, ValueError) else f"{type(innermost).__name__}: "
    return prefix + one_line(innermost)
  if len(lines) > 1:
    return lines[-1]
  return " ".join(lines) or type(error).__name__
