"""benchmarks/op_ceiling.py's op census: every convolution and matmul of a jaxpr, counted through
scan trip counts, the cheaper branch of a cond, dead code removed; FLOPs in closed form."""
import jax
import jax.numpy as jnp
from jax._src.interpreters import partial_eval

from tests import helpers


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _census(fn, *args):
  ceiling = helpers.load_script("benchmarks/op_ceiling.py", "op_ceiling")
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  jaxpr, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  counts, unknown = ceiling.collect_ops(jaxpr)
  by_kind = {}
  for count, eqn in counts.values():
    flops = ceiling.op_flops(eqn)
    name = eqn.primitive.name
    by_kind[name] = [a + b for a, b in zip(by_kind.get(name, [0, 0]), [count, count * flops])]
  return by_kind, unknown


def test_counts_through_scans_and_the_cheaper_cond_branch_and_skips_dead_ops():
  x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
  a, b = jnp.ones((4, 7)), jnp.ones((7, 9))

  def fn(x, w, a, b):
    def step(carry, _):
      return carry, _conv(x, w).sum() + (a @ b).sum()  # 1 conv + 1 dot per step

    _, ys = jax.lax.scan(step, 0.0, None, length=3)
    dead = (a @ b) @ b.T  # noqa: F841  (unused: two dots that dead-code removal drops)
    cheap_or_costly = jax.lax.cond(ys[0] > 0, lambda: (a @ b).sum() + (a @ b @ b.T).sum(),
                                   lambda: (a @ b).sum())
    return ys.sum() + cheap_or_costly.sum()

  census, unknown = _census(fn, x, w, a, b)
  assert not unknown
  conv_flops = 2 * (2 * 6 * 6 * 5) * (3 * 3 * 3)  # 2 |out| (window x in-features)
  dot_flops = 2 * (4 * 9) * 7
  assert census["conv_general_dilated"] == [3, 3 * conv_flops]
  # 3 in the scan, 1 of the cond's cheaper branch; not the dead pair, not the costly branch
  assert census["dot_general"] == [4, 4 * dot_flops]


def test_batched_dot_and_a_while_loop_is_flagged():
  q, k = jnp.ones((2, 5, 4, 3)), jnp.ones((2, 6, 4, 3))

  def attention_scores(q, k, trips):
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    return jax.lax.fori_loop(0, trips, lambda i, s: s * 2.0, scores)  # traced bound: a while

  census, unknown = _census(attention_scores, q, k, jnp.int32(3))
  assert unknown  # a while loop's trip count is not in the jaxpr
  assert census["dot_general"] == [1, 2 * (2 * 4 * 5 * 6) * 3]
  assert list(census) == ["dot_general"]
