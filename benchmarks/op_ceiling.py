"""Op ceiling: how fast an epoch's phases would be if nothing but their convolutions and
matmuls took time.

Issue 15 asks for epoch and evaluation times on the 2-core CPU that no change of layout, fusion
or flags has reached. This benchmark estimates what any such change could give. It walks the
jaxprs of the epoch's kernels (the rollout per sample batch, prepare with the critic's
embedding, train_epoch with its forward and backward passes, the evaluation's held-out
`rollout_kl`), dead code removed as XLA removes it, multiplying through `scan` trip counts, and
collects every `conv_general_dilated` and `dot_general` with its shapes and parameters. Each
distinct op is compiled and timed on this machine inside a scan of `INNER_CALLS` calls (as in
our kernels), alone and as two independent copies per iteration (XLA:CPU runs a small
convolution on about one core: two copies can use both), less an empty scan; the better of the
two, per call, times the op's count, summed over the phase, is its ceiling: the time of its
FLOP-carrying ops at the best rate this runtime gives them alone, with all else (elementwise
fusions, GroupNorm, softmax, copies, the scans' control) free. The measured phases (the same
process, after the ceiling, warm kernels, each phase waited for, median of `--epochs`) are
printed beside it, with the three heaviest ops of each phase:

  python benchmarks/op_ceiling.py --config=tdpo_jax/configs/shapes.py --epochs=3

An estimate, not a proof: ops inside a real kernel can run faster than alone (layouts chosen
with their neighbours, more concurrency than two copies: tiny's critic embedding, 4 concurrent
chains, ran at 0.75x its ceiling), and another convolution library could be faster than
XLA:CPU's. A `while` loop's trip count is unknown to the jaxpr: its body is counted once and
the phase is flagged. Of a `cond`, the cheaper branch is counted.
"""
import collections
import statistics
import sys

from absl import flags

import alternation

COUNTED = ("conv_general_dilated", "dot_general")
TOP_OPS = 3  # heaviest ops printed per phase
INNER_CALLS = 8  # calls of one op per timed kernel (`time_op`)


def define_flags(flag_values, argv):
  from tdpo_jax import cli  # noqa: PLC0415
  cli.define_config(flag_values, argv, default="tdpo_jax/configs/shapes.py")
  flags.DEFINE_integer("epochs", 3, "Measured epochs (each phase waited for), after a warm-up.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("repeats", 5, "Timed rounds of each isolated op (median).",
                       lower_bound=1, flag_values=flag_values)


def op_flops(eqn):
  """Multiply-adds x 2 of one `conv_general_dilated` or `dot_general` jaxpr equation.

  conv: 2 * |output| * (kernel window * input features per group); dot: 2 * |output| * (product
  of the contracted dims).
  """
  import numpy as np  # noqa: PLC0415
  in_avals, out_aval, params = [v.aval for v in eqn.invars], eqn.outvars[0].aval, eqn.params
  if eqn.primitive.name == "conv_general_dilated":
    rhs = in_avals[1].shape
    rhs_spec = params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    window = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
    return 2 * int(np.prod(out_aval.shape)) * window * rhs[rhs_spec[1]]
  (lhs_contract, _), _ = params["dimension_numbers"]
  contracted = int(np.prod([in_avals[0].shape[d] for d in lhs_contract]))
  return 2 * int(np.prod(out_aval.shape)) * contracted


def _sub_jaxprs(eqn):
  """(multiplier, jaxpr) of each sub-computation of `eqn` that runs, and whether a trip count
  was unknown. `cond` is handled by the caller."""
  from jax.extend import core  # noqa: PLC0415
  found, unknown = [], False
  multiplier = eqn.params["length"] if eqn.primitive.name == "scan" else 1
  if eqn.primitive.name == "while":
    unknown = True
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, core.ClosedJaxpr):
        found.append((multiplier, item.jaxpr))
      elif isinstance(item, core.Jaxpr):
        found.append((multiplier, item))
  return found, unknown


def add_counts(into, counts):
  """Adds the op counts `counts` ({key: [count, eqn]}) into `into`, in place."""
  for key, (count, eqn) in counts.items():
    into.setdefault(key, [0, eqn])[0] += count


def collect_ops(jaxpr, multiplier=1, counts=None):
  """{op key: [count, example eqn]} of every counted op in `jaxpr` and its sub-jaxprs, counts
  multiplied through scan lengths; plus whether a while loop (unknown trip count) was seen.

  The key is (primitive, input shapes/dtypes, params) so equal ops anywhere share one entry.
  """
  counts = collections.OrderedDict() if counts is None else counts
  unknown = False
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name in COUNTED:
      key = (name, tuple((v.aval.shape, str(v.aval.dtype)) for v in eqn.invars),
             repr(sorted((k, repr(v)) for k, v in eqn.params.items())))
      entry = counts.setdefault(key, [0, eqn])
      entry[0] += multiplier
      continue
    if name == "cond":
      branches = []
      for branch in eqn.params["branches"]:
        sub, sub_unknown = collect_ops(branch.jaxpr, multiplier)
        branches.append((sum(c * op_flops(e) for c, e in sub.values()), sub))
        unknown |= sub_unknown
      add_counts(counts, min(branches, key=lambda b: b[0])[1])
      continue
    subs, sub_unknown = _sub_jaxprs(eqn)
    unknown |= sub_unknown
    for sub_multiplier, sub in subs:
      unknown |= collect_ops(sub, multiplier * sub_multiplier, counts)[1]
  return counts, unknown


def time_op(eqn, repeats, unroll=INNER_CALLS):
  """Estimated seconds of one call of `eqn` inside a kernel on this machine (at best).

  The op runs `unroll` times in a `lax.scan` over distinct stacked inputs (as in our kernels:
  inside a compiled loop, inputs read from memory, no per-call dispatch), alone and as two
  independent copies per iteration (XLA:CPU runs a small convolution on about one core: two
  copies can use both). Per call: (the better of one copy and half of two copies, less an empty
  scan of the same trip count) / `unroll`.
  """
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  primitive, params = eqn.primitive, dict(eqn.params)
  avals = [v.aval for v in eqn.invars]
  keys = jax.random.split(jax.random.key(0), 2 * len(avals))
  stacked = [jax.random.normal(k, (unroll,) + a.shape, a.dtype)
             for k, a in zip(keys, avals + avals)]
  count = len(avals)

  def scanned(copies):
    def body(carry, xs):
      outs = tuple(primitive.bind(*xs[c * count:(c + 1) * count], **params)
                   for c in range(copies))
      return carry, outs
    return jax.jit(lambda *xs: jax.lax.scan(body, 0.0, xs)[1])

  empty = jax.jit(lambda x: jax.lax.scan(lambda c, y: (c + y, None), 0.0, x)[0])
  ramp = jnp.arange(unroll, dtype=jnp.float32)
  versions = {"one": (lambda: stacked[:count], scanned(1)),
              "two": (lambda: stacked, scanned(2)),
              "empty": (lambda: (ramp,), empty)}
  for prepare, run in versions.values():
    jax.block_until_ready(run(*prepare()))  # compile
  median = alternation.median_seconds(versions, repeats)
  best = min(median["one"], median["two"] / 2)
  return max(best - median["empty"], 0.0) / unroll


def phase_ceiling(counts, timings):
  """(seconds, FLOPs, number of op calls) of a phase from its op counts and per-op seconds."""
  seconds = flops = calls = 0
  for key, (count, eqn) in counts.items():
    seconds += count * timings[key]
    flops += count * op_flops(eqn)
    calls += count
  return seconds, flops, calls


def main(argv=None):
  from tdpo_jax import cli  # noqa: PLC0415
  values = cli.parse_flags_only(argv, define_flags, "benchmarks/op_ceiling.py")
  import math  # noqa: PLC0415
  import jax  # noqa: PLC0415
  from jax._src.interpreters import partial_eval  # noqa: PLC0415  (dce_jaxpr: no public API)
  from tdpo_jax import config_checks  # noqa: PLC0415
  from tdpo_jax import evaluation  # noqa: PLC0415
  from tdpo_jax import kernels as kernels_lib  # noqa: PLC0415
  from tdpo_jax import train  # noqa: PLC0415
  config = values["config"].value
  config.log.progress = False
  config_checks.validate_config(config)
  trainer = train.Trainer(config)
  frozen, state = trainer.frozen_params(), trainer.init_state()
  abstract = kernels_lib.abstract_epoch_inputs(trainer.kernels, config, state, frozen,
                                               trainer.input_uncond)
  n_batches = config.sample.num_batches_per_epoch
  phases = {"sample": [(trainer.kernels.rollout, abstract["rollout"], n_batches)],
            "prepare": [(trainer.kernels.prepare, abstract["prepare"], 1)],
            "train": [(trainer.kernels.train_epoch, abstract["train_epoch"], 1)]}
  if config.eval.every and config.eval.kl_to_pretrained:
    eval_samples = len(evaluation.heldout_prompt_list(config)) * config.eval.samples_per_prompt
    eval_calls = math.ceil(eval_samples / config.sample.batch_size)
    phases["eval sampling (KL)"] = [(trainer.kernels.rollout_kl,
                                     abstract["rollout"] + (frozen.unet,), eval_calls)]
  counted, flagged = {}, set()
  for phase, kernels in phases.items():
    total = collections.OrderedDict()
    for kernel, args, calls in kernels:
      # Dead code first (as XLA removes it): e.g. metrics no output reads.
      jaxpr = jax.make_jaxpr(kernel)(*args).jaxpr
      jaxpr, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
      ops, unknown = collect_ops(jaxpr, calls)
      if unknown:
        flagged.add(phase)
      add_counts(total, ops)
    counted[phase] = total
  distinct = {key: eqn for ops in counted.values() for key, (_, eqn) in ops.items()}
  print(f"device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}); "
        f"{len(distinct)} distinct conv/dot ops, each timed alone (median of "
        f"{values['repeats'].value})", flush=True)
  timings = {}
  for index, (key, eqn) in enumerate(distinct.items()):
    timings[key] = time_op(eqn, values["repeats"].value)
    if (index + 1) % 25 == 0:
      print(f"  timed {index + 1}/{len(distinct)}", flush=True)

  # Measured phases: warm epochs with each phase waited for (`time/*` metrics).
  trainer.sync_phases = True
  warm = max(1, config.reset.period - int(state.epoch)) if trainer.use_reset else 1
  measured = []
  for index in range(warm + values["epochs"].value):
    state, metrics, *_ = trainer.run_epoch(state, frozen)
    if index >= warm:
      measured.append({k[5:-2]: v for k, v in metrics.items() if k.startswith("time/")})
  seconds = {k: statistics.median(m[k] for m in measured) for k in measured[0]}
  print(f"{'phase':22s} {'measured s':>10s} {'ceiling s':>9s} {'ratio':>6s} {'GFLOP':>8s} "
        f"{'ceiling GFLOP/s':>15s} {'op calls':>9s}")
  total_measured = total_ceiling = 0.0
  for phase, ops in counted.items():
    ceiling, flops, calls = phase_ceiling(ops, timings)
    got = seconds.get(phase)
    got_text = f"{got:10.3f}" if got is not None else f"{'-':>10s}"
    ratio = f"{got / ceiling:6.2f}" if got and ceiling else f"{'':6s}"
    mark = " (while loop: body counted once)" if phase in flagged else ""
    print(f"{phase:22s} {got_text} {ceiling:9.3f} {ratio} {flops / 1e9:8.1f} "
          f"{flops / max(ceiling, 1e-12) / 1e9:15.1f} {calls:9d}{mark}")
    heaviest = sorted(ops.items(), key=lambda item: -item[1][0] * timings[item[0]])[:TOP_OPS]
    for key, (count, eqn) in heaviest:
      shapes = " x ".join(str(tuple(v.aval.shape)) for v in eqn.invars)
      print(f"    {count:6d} x {timings[key] * 1e3:8.3f} ms  {eqn.primitive.name} {shapes} -> "
            f"{tuple(eqn.outvars[0].aval.shape)}")
    if got is not None:
      total_measured += got
      total_ceiling += ceiling
  print(f"{'epoch (these phases)':22s} {total_measured:10.3f} {total_ceiling:9.3f} "
        f"{total_measured / max(total_ceiling, 1e-12):6.2f}")


if __name__ == "__main__":
  main(sys.argv[1:])
