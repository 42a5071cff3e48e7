"""The teacher-forced forward pass training differentiates.

It runs the model's own modules through the decoder block's body
(`DecoderLayer._block`: `h += attn(norm(h)); h += ffn(norm(h))`) with three changes
for training:

* attention in query chunks, each under `jax.checkpoint`: chunk i attends to keys
  [0, (i+1)·chunk) only, and its backward recomputes its scores instead of keeping
  them, so memory grows with S·chunk, not S² (MLA's expanded form, `attend_expanded`);
* the MoE's routed experts through `train.experts` (a kernel with a gradient, expert
  parallel on a mesh), with each layer's routing kept for the load-balancing loss and
  the per-expert token fractions;
* each block rematerialised (`nnx.remat`): only its input stays alive for the backward.

Names: B batch, S sequence, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.nn.decoder import DecoderLayer, Transformer
from smallfour.nn.mla import MLA
from smallfour.nn.moe import MoE
from smallfour.nn.rope import PositionEncoding
from smallfour.train import experts

_F32 = jnp.float32


class Routing(NamedTuple):
  """One MoE layer's routing over the real tokens of a batch."""

  fractions: jax.Array  # [E] share of the token-expert assignments each expert got
  aux: jax.Array  # [] E · Σ_e fraction_e · mean router probability_e; 1 when balanced


def hidden_states(model: Transformer, tokens: jax.Array, valid: jax.Array, chunk: int,
                  remat: bool = True) -> tuple[jax.Array, list[Routing]]:
  """tokens: [B, S] int; valid: [B, S] bool (real tokens; padding follows them).

  S must be a multiple of `chunk`. Returns the last block's output [B, S, D] (before
  the final norm) and the routing of each MoE layer, in order.
  """
  b, s = tokens.shape
  if s % chunk:
    raise ValueError(f"sequence length {s} is not a multiple of the attention chunk {chunk}")
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  h = model.embed(tokens)
  pos = model.positions(positions, h.dtype)
  # graph_updates=False: a block mutates nothing, and handing its variables back out
  # would update frozen parameters that belong to an outer trace (TraceContextError).
  run = nnx.remat(block, static_argnums=(4,), graph_updates=False) if remat else block
  routing = []
  for layer in model.layers:
    h, r = run(layer, h, pos, valid, chunk)
    if r is not None:
      routing.append(r)
  return h, routing


def block(layer: DecoderLayer, h: jax.Array, pos: PositionEncoding, valid: jax.Array,
          chunk: int) -> tuple[jax.Array, Routing | None]:
  """One decoder block. h: [B, S, D] -> ([B, S, D], its routing if a MoE layer)."""
  h = h + attend(layer.attn, layer.input_norm(h), pos, valid, chunk)
  x = layer.post_attn_norm(h)
  if isinstance(layer.ffn, MoE):
    out, routing = moe(layer.ffn, x, valid)
    return h + out, routing
  return h + layer.ffn(x), None


def attend(attn: MLA, x: jax.Array, pos: PositionEncoding, valid: jax.Array,
           chunk: int) -> jax.Array:
  """Causal self-attention in query chunks. x: [B, S, D]; valid: [B, S] -> [B, S, D]."""
  q_nope, q_rope = attn.queries(x, pos)
  c, k_rope = attn.latents(x, pos)
  expanded = jax.checkpoint(attn.attend_expanded)
  outs = []
  for i in range(x.shape[1] // chunk):
    rows, keys = slice(i * chunk, (i + 1) * chunk), slice(0, (i + 1) * chunk)
    causal = jnp.arange(keys.stop)[None, :] <= jnp.arange(rows.start, rows.stop)[:, None]
    mask = causal[None] & valid[:, None, keys]  # [B, chunk, keys]
    outs.append(expanded(q_nope[:, rows], q_rope[:, rows], c[:, keys], k_rope[:, keys], mask))
  return jnp.concatenate(outs, axis=1)


def moe(ffn: MoE, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, Routing]:
  """The MoE (router in float32, routed + shared experts). x: [B, S, D] -> [B, S, D]."""
  flat = x.reshape(-1, x.shape[-1])
  weights, ids = ffn.router(flat)
  ex = ffn.experts
  out = experts.routed_experts(ex.gate_proj[...], ex.up_proj[...], ex.down_proj[...], flat,
                               weights, ids).reshape(x.shape)
  if ffn.shared_experts is not None:
    out = out + ffn.shared_experts(x)
  # The router's probabilities over all experts, as `Router` computes them, for the loss.
  probs = jax.nn.softmax(flat.astype(_F32) @ ffn.router.kernel[...].astype(_F32), axis=-1)
  return out, routing_stats(probs, ids, valid.reshape(-1))


def routing_stats(probs: jax.Array, ids: jax.Array, valid: jax.Array) -> Routing:
  """probs: [N, E] float32; ids: [N, K]; valid: [N] bool -> Routing over the valid rows.

  The Switch Transformer's balance loss: the assignment fractions carry no gradient,
  the mean probabilities do, so it pushes probability toward under-used experts.
  """
  num_experts = probs.shape[-1]
  real = valid.astype(_F32)
  count = jnp.maximum(real.sum(), 1.0)
  assigned = jax.nn.one_hot(ids, num_experts, dtype=_F32).sum(1) * real[:, None]  # [N, E]
  fractions = assigned.sum(0) / (count * ids.shape[1])
  mean_prob = (probs * real[:, None]).sum(0) / count
  return Routing(fractions, num_experts * jnp.sum(jax.lax.stop_gradient(fractions) * mean_prob))
