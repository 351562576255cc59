"""Per-prompt reward normaliser as a checkpointable pytree (DESIGN §3, "Rewards and
normalisation").

Shape legend: B batch, P number of prompts in the prompt set, N buffer size per prompt (32).

The semantics are DDPO's `PerPromptStatTracker` (Black et al. 2023), which TDPO-R uses:
each prompt keeps a ring buffer of its last N rewards. For a batch, first all of the batch's
rewards are appended to their prompts' buffers (in batch order, evicting the oldest beyond N);
then each sample is normalised as

  r~ = (r - mean) / (std + eps)

with (mean, std) the mean and population std of its prompt's buffer if that buffer holds at least
`min_count` rewards, else of the whole batch's rewards.

Prompts are identified by an integer index into the prompt set (0 <= index < P). The state holds
no strings, so it is a plain array pytree that orbax saves and `jit` accepts.
"""
import flax
import jax
import jax.numpy as jnp


class NormaliserState(flax.struct.PyTreeNode):
  """Ring buffers of the last N rewards of each prompt.

  Attributes:
    buffer: (P, N) float32 stored rewards; entries at positions >= count are unused (zeros).
    count: (P,) int32 the number of valid entries, min(rewards seen, N).
    pos: (P,) int32 the next position to write (the oldest entry once the buffer is full).
  """
  buffer: jnp.ndarray
  count: jnp.ndarray
  pos: jnp.ndarray


def init_normaliser(num_prompts, buffer_size):
  """An empty normaliser.

  Args:
    num_prompts: P, the number of prompts in the prompt set (>= 1).
    buffer_size: N, the number of recent rewards kept per prompt (>= 1; 32 in DESIGN §3).

  Returns:
    NormaliserState with buffer (P, N) zeros, count (P,) zeros, pos (P,) zeros.
  """
  for name, value in (("num_prompts", num_prompts), ("buffer_size", buffer_size)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}={value!r}; expected a positive integer")
  return NormaliserState(buffer=jnp.zeros((num_prompts, buffer_size), jnp.float32),
                         count=jnp.zeros((num_prompts,), jnp.int32),
                         pos=jnp.zeros((num_prompts,), jnp.int32))


def _add(state, prompt_index, rewards):
  """Appends rewards (B,) to their prompts' ring buffers, in batch order.

  Vectorised, no loop over the batch: sample i is the rank_i-th (0-based) of the k_p samples of
  its prompt p in this batch, so it goes to position (pos_p + rank_i) mod N. Only the last N
  samples of each prompt are written (earlier ones would be evicted within this batch anyway),
  which keeps the scatter's indices unique.
  """
  num_prompts, buffer_size = state.buffer.shape
  batch_size = rewards.shape[0]
  same_prompt = prompt_index[:, None] == prompt_index[None, :]
  earlier = jnp.tril(jnp.ones((batch_size, batch_size), bool), k=-1)
  rank = jnp.sum(same_prompt & earlier, axis=1, dtype=jnp.int32)
  batch_count = jax.ops.segment_sum(jnp.ones_like(prompt_index), prompt_index,
                                    num_segments=num_prompts)
  kept = rank >= batch_count[prompt_index] - buffer_size
  position = (state.pos[prompt_index] + rank) % buffer_size
  row = jnp.where(kept, prompt_index, num_prompts)  # Out of bounds: dropped by the scatter.
  buffer = state.buffer.at[row, position].set(rewards.astype(state.buffer.dtype), mode="drop")
  count = jnp.minimum(state.count + batch_count, buffer_size).astype(jnp.int32)
  pos = ((state.pos + batch_count) % buffer_size).astype(jnp.int32)
  return NormaliserState(buffer=buffer, count=count, pos=pos)


def normalise(state, prompt_index, rewards, *, min_count, eps, per_prompt=True):
  """Adds a batch's rewards to the per-prompt buffers and normalises them (DESIGN §3).

  Equation: r~_i = (r_i - m_i) / (s_i + eps), where (m_i, s_i) are the mean and population std of
  the (up to N) stored rewards of prompt p_i after adding this batch, if it holds >= min_count of
  them, else the mean and population std of all B rewards of the batch (DDPO's
  PerPromptStatTracker).

  Jittable (min_count, eps static or traced scalars); no Python loop over the batch.
  Not handled, by design: NaN/inf rewards (they would poison the prompt's buffer for its next N
  rewards and the batch statistics; the training loop checks rewards before calling this) and
  prompt indices outside [0, P) (under jit they cannot raise: out-of-range writes are dropped and
  reads clamped; the caller maps prompts to indices).

  Args:
    state: NormaliserState with buffer (P, N).
    prompt_index: (B,) int, each sample's prompt index in [0, P).
    rewards: (B,) float rewards.
    min_count: the number of stored rewards from which a prompt's own statistics are used
      (16 in DESIGN §3); must be <= N to ever be reached.
    eps: added to the std (1e-6 in DESIGN §3).
    per_prompt: False = always the batch's statistics (DDPO's `per_prompt_stat_tracking=False`);
      the buffers are still filled, so the state is the same either way.

  Returns:
    (new state, normalised rewards (B,) float32).
  """
  buffer_size = state.buffer.shape[1]
  if isinstance(min_count, int) and not 0 <= min_count <= buffer_size:
    raise ValueError(f"min_count={min_count}; expected an integer in [0, buffer_size="
                     f"{buffer_size}] (a prompt's buffer never holds more than buffer_size)")
  prompt_index = jnp.asarray(prompt_index, jnp.int32)
  rewards = jnp.asarray(rewards, jnp.float32)
  if prompt_index.ndim != 1 or rewards.shape != prompt_index.shape:
    raise ValueError(f"prompt_index has shape {prompt_index.shape} and rewards {rewards.shape}; "
                     "expected two equal (B,) shapes")
  state = _add(state, prompt_index, rewards)

  stored = state.buffer[prompt_index]  # (B, N)
  stored_count = state.count[prompt_index]  # (B,)
  valid = jnp.arange(buffer_size)[None, :] < stored_count[:, None]
  denominator = jnp.maximum(stored_count, 1).astype(jnp.float32)
  prompt_mean = jnp.sum(jnp.where(valid, stored, 0.0), axis=1) / denominator
  prompt_variance = jnp.sum(jnp.where(valid, (stored - prompt_mean[:, None])**2, 0.0),
                            axis=1) / denominator
  use_prompt = (stored_count >= min_count) & per_prompt
  mean = jnp.where(use_prompt, prompt_mean, jnp.mean(rewards))
  std = jnp.where(use_prompt, jnp.sqrt(prompt_variance), jnp.std(rewards))
  return state, (rewards - mean) / (std + eps)


def group_normalise(rewards, group_size, eps):
  """GRPO's advantage: each reward standardised within its group of `group_size` samples.

  Equation: r~_i = (r_i - mean_g) / (std_g + eps) with the mean and population std of the G
  rewards of sample i's group g (Shao et al. 2024; Flow-GRPO / DanceGRPO for diffusion). Groups
  are consecutive: samples g G .. g G + G - 1 share a prompt (`prompts.grouped_prompt_indices`).
  The statistics come from this epoch's group only, never from a buffer.

  Args:
    rewards: (N,) float, N a multiple of G.
    group_size: G.
    eps: added to the std.

  Returns:
    (N,) float32.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim != 1 or rewards.shape[0] % group_size:
    raise ValueError(f"rewards have shape {rewards.shape}; expected (N,) with N a multiple of "
                     f"group_size={group_size}")
  groups = rewards.reshape(-1, group_size)
  mean = groups.mean(axis=1, keepdims=True)
  std = groups.std(axis=1, keepdims=True)
  return ((groups - mean) / (std + eps)).reshape(-1)


def prompt_stats(state, *, min_count):
  """Summary statistics of the normaliser, for logging.

  Args:
    state: NormaliserState.
    min_count: the threshold passed to `normalise`.

  Returns:
    A dict of scalars: "stats/num_prompts_seen" (prompts with >= 1 stored reward),
    "stats/num_prompts_ready" (prompts with >= min_count, normalised by their own statistics),
    "stats/mean_buffer_count" (mean number of stored rewards per prompt).
  """
  return {
      "stats/num_prompts_seen": jnp.sum(state.count > 0),
      "stats/num_prompts_ready": jnp.sum(state.count >= min_count),
      "stats/mean_buffer_count": jnp.mean(state.count.astype(jnp.float32)),
  }
