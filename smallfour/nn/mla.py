"""Multi-head latent attention (DeepSeek-V3 style MLA), spec §2.3 and §2.7.

Parameters are laid out so that both forms share one copy: `kv_b_proj` is stored as
`k_up` (W_UK, [H, R, Dn]) and `v_up` (W_UV, [H, Dv, R]). The expanded form rebuilds
per-head keys and values from the latent (prefill); the absorbed form folds `k_up`
into the query and applies `v_up` after attending over the latent (decode). Both are
head-major because decode's head-batched products want exactly these layouts: stored
[R, H, ·], XLA:CPU transposed both on every decode step.

Names: B batch, S queries, T keys, D hidden, H heads, Q q_lora_rank, R kv_lora_rank,
Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from smallfour import sharding
from smallfour.config import TextConfig
from smallfour.nn import params
from smallfour.nn.norm import RMSNorm
from smallfour.nn.paged_attention import (attend_in_blocks, gather_pages, key_block_pages,
                                          write_pages)
from smallfour.nn.rope import PositionEncoding, apply_rope

_F32 = jnp.float32
UNROLL_CHUNKS = 8  # prefill chunks unrolled (causal block skipping) before lax.map


class MLA(nnx.Module):
  """Attention with a compressed query and a compressed, head-free KV latent."""

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
               fp8: bool = False):
    """`fp8`: the projections are held FP8-resident (`params.weight`), as released."""
    d, h, q, r = cfg.hidden_size, cfg.num_heads, cfg.q_lora_rank, cfg.kv_lora_rank
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    self.nope_dim, self.latent_dim = dn, r
    # Per (query, key) pair the absorbed form multiplies over the latent twice, H(2R + Dr),
    # the expanded one over the heads' dims, H(Dn + Dr + Dv), once each key is lifted to
    # the heads at H·R(Dn + Dv), a cost the queries share: expanded wins past this many.
    self.expand_after = r * (dn + dv) / max(1, (2 * r + dr) - (dn + dr + dv))
    self.softmax_scale = cfg.softmax_scale
    w = lambda shape, axes, fan_in: params.weight(  # noqa: E731
        rngs, shape, axes, fan_in=fan_in, dtype=param_dtype, fp8_scales=0 if fp8 else None)
    self.q_a_proj = w((d, q), ("embed", "q_lora"), d)
    self.q_a_norm = RMSNorm(q, eps=cfg.latent_norm_eps, param_dtype=param_dtype)
    self.q_b_proj = w((q, h, dn + dr), ("q_lora", "heads", "qk_head_dim"), q)
    self.kv_a_proj = w((d, r + dr), ("embed", "kv_lora_rope"), d)
    self.kv_a_norm = RMSNorm(r, eps=cfg.latent_norm_eps, param_dtype=param_dtype)
    self.k_up = w((h, r, dn), ("heads", "kv_lora", "qk_nope_head_dim"), r)
    self.v_up = w((h, dv, r), ("heads", "v_head_dim", "kv_lora"), r)
    self.o_proj = w((h, dv, d), ("heads", "v_head_dim", "embed"), h * dv)

  def queries(self, x: jax.Array, pos: PositionEncoding) -> tuple[jax.Array, jax.Array]:
    """x: [B, S, D] -> (q_nope [B, S, H, Dn], q_rope [B, S, H, Dr]), rotated and λ-scaled."""
    cq = self.q_a_norm(jnp.einsum("bsd,dq->bsq", x, self.q_a_proj[...]))
    q = jnp.einsum("bsq,qhk->bshk", cq, self.q_b_proj[...])
    scale = pos.query_scale[:, :, None, None]
    q_nope, q_rope = q[..., :self.nope_dim], apply_rope(q[..., self.nope_dim:], pos.cos, pos.sin)
    return q_nope * scale, q_rope * scale

  def latents(self, x: jax.Array, pos: PositionEncoding) -> tuple[jax.Array, jax.Array]:
    """x: [B, S, D] -> (normalised latent c [B, S, R], rotated shared key k_rope [B, S, Dr]).

    These two are all a KV cache needs to hold.
    """
    ckv = jnp.einsum("bsd,dk->bsk", x, self.kv_a_proj[...])
    c = self.kv_a_norm(ckv[..., :self.latent_dim])
    return c, apply_rope(ckv[..., self.latent_dim:], pos.cos, pos.sin)

  def __call__(self, x: jax.Array, pos: PositionEncoding, mask: jax.Array) -> jax.Array:
    """Expanded form over the sequence itself. x: [B, S, D], mask: [B, S, S] bool -> [B, S, D]."""
    q_nope, q_rope = self.queries(x, pos)
    c, k_rope = self.latents(x, pos)
    return self.attend_expanded(q_nope, q_rope, c, k_rope, mask)

  def prefill(self, x: jax.Array, pos: PositionEncoding, positions: jax.Array,
              valid: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Causal attention of right-padded prompts, in query chunks (`attend_chunked`).

    x: [B, S, D]; positions: [B, S]; valid: [B, S] bool marks real tokens.
    Returns (out [B, S, D], the cache rows of every token [B, S, R + Dr]).
    """
    q_nope, q_rope = self.queries(x, pos)
    c, k_rope = self.latents(x, pos)
    out = self.attend_chunked(q_nope, q_rope, c, k_rope, positions, valid, chunk)
    return out, jnp.concatenate([c, k_rope], axis=-1)

  def decode(self, x: jax.Array, pos: PositionEncoding, latent: jax.Array, layer: int,
             write_at: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One new token per sequence: writes its cache row, then attends absorbed.

    x: [B, 1, D]; latent: the whole stacked cache [L, B, T', R + Dr], of which this is
    layer `layer` (updated in place, so the donated cache is never copied); write_at: [B]
    cache index of each new row, < T' (a position never read takes the rows that must
    not be stored); mask: [B, 1, W] over the first W cache positions, the only ones read.
    Returns (out [B, 1, D], the updated cache [L, B, T', R + Dr]).
    """
    q_nope, q_rope = self.queries(x, pos)
    c, k_rope = self.latents(x, pos)
    new = jnp.concatenate([c, k_rope], axis=-1)[:, 0].astype(latent.dtype)  # [B, R + Dr]
    latent = write_rows(latent, layer, write_at, new)
    window = latent[layer, :, :mask.shape[-1]]
    return self.attend_absorbed(q_nope, q_rope, window, mask), latent

  def paged(self, x: jax.Array, pos: PositionEncoding, positions: jax.Array, pool: jax.Array,
            layer: int, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New tokens against a paged latent cache (`nn.paged_attention`): writes their rows,
    then attends.

    x: [B, S, D] at `positions` [B, S] (consecutive per row); pool: the whole stacked pool
    [L, P, page · (R + Dr)], of which this is layer `layer` (updated in place);
    page_table: [B, N] each row's pages, padded with the sink, N × page > every position.
    S == 1 (decode) writes one row per sequence and attends absorbed over the table's
    whole window; S > 1 (a prompt chunk) starts on a page boundary, writes whole pages and
    attends block by block up to its last position (`attend_pages`).
    Returns (out [B, S, D], the updated pool).
    """
    q_nope, q_rope = self.queries(x, pos)
    c, k_rope = self.latents(x, pos)
    rows = jnp.concatenate([c, k_rope], axis=-1).astype(pool.dtype)  # [B, S, R + Dr]
    mesh = jax.sharding.get_abstract_mesh()
    split = not mesh.empty and mesh.size > 1
    if split:
      # Whole on every device like the pool: rows split over devices (a chunk's tokens
      # are) would split the pool's pages the same way, a copy of the whole pool each way.
      rows = jax.lax.with_sharding_constraint(rows, P())
    pool = write_pages(pool, layer, positions[:, 0], page_table, rows)
    if x.shape[1] > 1:
      return self.attend_pages(q_nope, q_rope, pool, layer, page_table, positions), pool
    if split:  # each device gathers the windows of its rows only
      page_table = jax.lax.with_sharding_constraint(page_table, sharding.logical_spec(
          ("batch", "pages"), page_table.shape, mesh))
    window = gather_pages(pool, layer, page_table, rows.shape[-1])
    if split:  # each sequence's attention on the devices of its row
      window = jax.lax.with_sharding_constraint(window, sharding.logical_spec(
          ("batch", "length", "kv_lora_rope"), window.shape, mesh))
    mask = jnp.arange(window.shape[1])[None, None, :] <= positions[:, :, None]  # [B, 1, T]
    return self.attend_absorbed(q_nope, q_rope, window, mask), pool

  def attend_pages(self, q_nope: jax.Array, q_rope: jax.Array, pool: jax.Array, layer: int,
                   page_table: jax.Array, positions: jax.Array) -> jax.Array:
    """Queries at `positions` [B, S] over their sequences' cached rows, read one key block
    of the table at a time and only up to the last position (`attend_in_blocks`): the
    cost follows what is cached, not the table's width. Expanded when the chunk is long
    enough to amortize expanding each block's keys (`expands_for`), else absorbed.
    q_nope: [B, S, H, Dn], q_rope: [B, S, H, Dr]; pool, page_table as `paged` -> [B, S, D].
    """
    r, w = self.latent_dim, self.latent_dim + q_rope.shape[-1]
    page = pool.shape[2] // w
    per = key_block_pages(page, page_table.shape[1])
    tokens = per * page
    num_blocks = jnp.max(positions) // tokens + 1

    def rows(i):  # [B, tokens, R + Dr]: block i of every sequence's window
      pages = jax.lax.dynamic_slice_in_dim(page_table, i * per, per, axis=1)
      return gather_pages(pool, layer, pages, w)

    if self.expands_for(q_nope.shape[1]):
      q = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)  # [B, H, S, Dq]

      def block(i):
        latent = rows(i)
        k, v = self._head_major_keys(latent[..., :r], latent[..., r:])
        return jnp.einsum("bhsd,bhtd->bhst", q, k, preferred_element_type=_F32), v

      out = attend_in_blocks(block, num_blocks, tokens, positions, self.softmax_scale)
      return self._project_heads(out.astype(pool.dtype))
    q_latent = jnp.einsum("bshn,hrn->bshr", q_nope, self.k_up[...], preferred_element_type=_F32)
    q = jnp.concatenate([q_latent, q_rope.astype(_F32)], axis=-1)

    def block(i):
      latent = rows(i).astype(_F32)
      return jnp.einsum("bshk,btk->bhst", q, latent), latent[:, None]

    out = attend_in_blocks(block, num_blocks, tokens, positions, self.softmax_scale)
    out = jnp.einsum("bhsr,hvr->bshv", out[..., :r], self.v_up[...].astype(_F32))
    return self.project_out(out.astype(pool.dtype))

  def expands_for(self, queries: int) -> bool:
    """Whether `queries` queries of one sequence attend over a latent window more cheaply
    expanded than absorbed (`expand_after`)."""
    return queries > max(1, self.expand_after)

  def attend_expanded(self, q_nope: jax.Array, q_rope: jax.Array, c: jax.Array,
                      k_rope: jax.Array, mask: jax.Array) -> jax.Array:
    """Rebuilds per-head keys/values from the latent, then attends.

    q_nope: [B, S, H, Dn], q_rope: [B, S, H, Dr], c: [B, T, R], k_rope: [B, T, Dr],
    mask: [B, S, T] bool (True = may attend) -> [B, S, D].
    """
    k, v = self._head_major_keys(c, k_rope)
    q = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)  # [B, H, S, Dq]
    return self._project_heads(self._attend_heads(q, k, v, mask))

  def attend_chunked(self, q_nope: jax.Array, q_rope: jax.Array, c: jax.Array,
                     k_rope: jax.Array, q_pos: jax.Array, k_valid: jax.Array,
                     chunk: int) -> jax.Array:
    """The expanded form over query chunks, so memory grows linearly with the prompt.

    Each chunk of `chunk` queries attends to every key at a position ≤ its own (keys at
    index t have position t). Up to UNROLL_CHUNKS chunks are unrolled over key blocks of
    the same size (`_attend_causal_blocks`), skipping the causally masked blocks; longer
    prompts map one compiled chunk over all keys.
    q_pos: [B, S] query positions; k_valid: [B, T] bool; S must be a multiple of `chunk`.
    """
    b, s = q_pos.shape
    if s % chunk:
      raise ValueError(f"prompt length {s} is not a multiple of the chunk {chunk}")
    if s // chunk <= UNROLL_CHUNKS and c.shape[1] == s:
      return self._attend_causal_blocks(q_nope, q_rope, c, k_rope, q_pos, k_valid, chunk)
    # Head-major [B, H, T, ·] keys and values, laid out once for every chunk: each chunk's
    # two matmuls are then plain batched GEMMs with no per-chunk transposes.
    k, v = self._head_major_keys(c, k_rope)
    q = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)  # [B, H, S, Dq]
    k_pos = jnp.arange(c.shape[1])

    def one_chunk(q_chunk, qp):
      mask = (k_pos[None, None, :] <= qp[:, :, None]) & k_valid[:, None, :]
      return self._attend_heads(q_chunk, k, v, mask)

    split = lambda x, axis: jnp.moveaxis(  # noqa: E731
        x.reshape(*x.shape[:axis], s // chunk, chunk, *x.shape[axis + 1:]), axis, 0)
    out = jax.lax.map(lambda a: one_chunk(*a), (split(q, 2), split(q_pos, 1)))
    return self._project_heads(jnp.moveaxis(out, 0, 2).reshape(*q.shape[:3], -1))

  def _attend_causal_blocks(self, q_nope: jax.Array, q_rope: jax.Array, c: jax.Array,
                            k_rope: jax.Array, q_pos: jax.Array, k_valid: jax.Array,
                            chunk: int) -> jax.Array:
    """Causal attention of a whole prompt (keys = queries) in `chunk`-sized blocks.

    Keys and values are expanded per key block straight from the latent, and query block
    i scores key blocks 0..i only; one softmax spans those blocks (a shared max, then
    exp and the sum per block). Nothing is concatenated or sliced out of the expanded
    keys: XLA:CPU materialized those copies, ~30% of the attention at 1024 tokens.
    Only the diagonal block needs the causal mask (key position ≤ query position).
    Shapes as `attend_chunked`, with T = S.
    """
    blocks = [slice(j * chunk, (j + 1) * chunk) for j in range(q_pos.shape[1] // chunk)]
    keys = [self._head_major_keys(c[:, r], k_rope[:, r]) for r in blocks]
    outs = []
    for i, rows in enumerate(blocks):
      q = jnp.concatenate([q_nope[:, rows], q_rope[:, rows]], axis=-1).transpose(0, 2, 1, 3)
      scores = []
      for j, cols in enumerate(blocks[:i + 1]):
        keep = k_valid[:, None, cols]  # [B, 1, chunk]
        if j == i:
          keep = keep & (jnp.arange(cols.start, cols.stop)[None, None] <= q_pos[:, rows, None])
        block = jnp.einsum("bhsd,bhtd->bhst", q, keys[j][0], preferred_element_type=_F32)
        scores.append(jnp.where(keep[:, None], block * self.softmax_scale,
                                jnp.finfo(_F32).min))
      top = functools.reduce(jnp.maximum, [b.max(-1, keepdims=True) for b in scores])
      probs = [jnp.exp(b - top) for b in scores]
      total = sum(p.sum(-1, keepdims=True) for p in probs)  # [B, H, chunk, 1]
      out = sum(jnp.einsum("bhst,bhtv->bhsv", p.astype(v.dtype), v).astype(_F32)
                for p, (_, v) in zip(probs, keys))
      outs.append((out / total).astype(keys[0][1].dtype))
    return self._project_heads(jnp.concatenate(outs, axis=2))  # [B, H, S, Dv] -> [B, S, D]

  def _head_major_keys(self, c: jax.Array, k_rope: jax.Array) -> tuple[jax.Array, jax.Array]:
    """c: [B, T, R], k_rope: [B, T, Dr] -> (k [B, H, T, Dn + Dr], v [B, H, T, Dv])."""
    k_nope = jnp.einsum("btr,hrn->bhtn", c, self.k_up[...])
    rope = jnp.broadcast_to(k_rope[:, None], (*k_nope.shape[:3], k_rope.shape[-1]))
    return (jnp.concatenate([k_nope, rope.astype(k_nope.dtype)], axis=-1),
            jnp.einsum("btr,hvr->bhtv", c, self.v_up[...]))

  def _attend_heads(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array
                    ) -> jax.Array:
    """q: [B, H, S, Dq], k: [B, H, T, Dq], v: [B, H, T, Dv], mask: [B, S, T] -> [B, H, S, Dv]."""
    scores = jnp.einsum("bhsd,bhtd->bhst", q, k, preferred_element_type=_F32)
    probs = _masked_softmax(scores * self.softmax_scale, mask).astype(v.dtype)
    return jnp.einsum("bhst,bhtv->bhsv", probs, v)

  def project_out(self, o: jax.Array) -> jax.Array:
    """o: [B, S, H, Dv] -> [B, S, D]."""
    return jnp.einsum("bshv,hvd->bsd", o, self.o_proj[...])

  def _project_heads(self, o: jax.Array) -> jax.Array:
    """o: [B, H, S, Dv] (head-major) -> [B, S, D]."""
    return jnp.einsum("bhsv,hvd->bsd", o, self.o_proj[...])

  def attend_absorbed(self, q_nope: jax.Array, q_rope: jax.Array, latent: jax.Array,
                      mask: jax.Array) -> jax.Array:
    """Attends over the latent without expanding it (spec §2.7).

    q_nope: [B, S, H, Dn], q_rope: [B, S, H, Dr], latent: [B, T, R + Dr] = [c | k_rope]
    as the cache stores it, mask: [B, S, T] bool -> [B, S, D].
    Scores are [q̃ | q_rope] · [c | k_rope] with q̃ = W_UKᵀ q_nope, in one einsum
    straight off the cache; values are c, lifted by W_UV after the sum. The latent
    products run in float32 so decode stays close to the expanded form.
    """
    q_latent = jnp.einsum("bshn,hrn->bshr", q_nope, self.k_up[...], preferred_element_type=_F32)
    q = jnp.concatenate([q_latent, q_rope.astype(_F32)], axis=-1)
    latent32 = latent.astype(_F32)
    scores = jnp.einsum("bshk,btk->bhst", q, latent32)
    probs = _masked_softmax(scores * self.softmax_scale, mask)
    # Summing the whole [c | k_rope] rows and dropping k_rope after reads the cache once.
    out_latent = jnp.einsum("bhst,btk->bshk", probs, latent32)[..., :self.latent_dim]
    out = jnp.einsum("bshr,hvr->bshv", out_latent, self.v_up[...].astype(_F32))
    return self.project_out(out.astype(latent.dtype))


def write_rows(latent: jax.Array, layer: int, write_at: jax.Array, rows: jax.Array
               ) -> jax.Array:
  """`latent[layer, b, write_at[b]] = rows[b]` for every b, in place.

  latent: [L, B, T, W]; write_at: [B], each in [0, T); rows: [B, W].
  One `dynamic_update_slice` per sequence, on the device holding it (a shard_map over
  the batch's mesh axes), and no bounds check (the cache keeps a sink position for
  writes that must not land). XLA:TPU lays out a cache updated by a scatter, by a
  partitioned update or next to a bounds-checking read of its own, anew: it copies
  the whole cache into that layout and back on every decode step (2 × 0.75 GB per
  32K-token sequence of the release), where local slice updates leave it in place.
  """
  def write(latent, write_at, rows):
    for b in range(rows.shape[0]):
      row = rows[b].reshape(1, 1, 1, -1)
      latent = jax.lax.dynamic_update_slice(latent, row, (layer, b, write_at[b], 0))
    return latent

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return write(latent, write_at, rows)
  batch = sharding.logical_spec(("batch",), (rows.shape[0],), mesh)[0]
  return jax.shard_map(write, mesh=mesh, in_specs=(P(None, batch), P(batch), P(batch)),
                       out_specs=P(None, batch))(latent, write_at, rows)


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """scores: [B, H, S, T] float32, mask: [B, S, T] -> float32 probabilities over T."""
  scores = jnp.where(mask[:, None], scores, jnp.finfo(_F32).min)
  return jax.nn.softmax(scores, axis=-1)
