"""The paged latent cache's reads and writes: new rows into their pages, a sequence's
window gathered whole (decode) or one block of keys at a time (prompt chunks).

The pool is `[L, P, page · W]`, W = R + Dr: a page's rows lie end to end in one row of
the pool. W (320 in the release) is not a multiple of TPU's 128 lanes, so `[.., page, W]`
would be padded to 384 and XLA:TPU would rather lay the pool out with pages minor, then
copy it whole between that layout and the updates' around every layer; page · W is
lane-dense for any even page size. The pool's last page is the sink: padding in page
tables points there, and writes that must not land go there; it is never read as a
sequence's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_F32 = jnp.float32
KEY_BLOCK = 512  # tokens of a window that one step of a prompt chunk's attention reads


def write_pages(pool: jax.Array, layer: int, start: jax.Array, page_table: jax.Array,
                rows: jax.Array) -> jax.Array:
  """Writes `rows` [B, S, W] of each sequence at positions start[b] .. start[b] + S - 1 of
  layer `layer` of `pool` [L, P, page · W], through `page_table` [B, N], in place.

  One `dynamic_update_slice` per sequence (S == 1) or per page (S a multiple of the page
  size, `start` on a page boundary), without bounds checks: XLA:TPU copies a cache
  updated by a scatter into a layout of its own and back. Pages of padding past the
  table's end go to the sink.
  """
  b, s, w = rows.shape
  page, sink = pool.shape[2] // w, pool.shape[1] - 1
  for i in range(b):
    first = start[i] // page
    if s == 1:
      at = (layer, page_table[i, first], start[i] % page * w)
      pool = jax.lax.dynamic_update_slice(pool, rows[i].reshape(1, 1, w), at)
      continue
    for j in range(s // page):
      index = first + j
      target = jnp.where(index < page_table.shape[1],
                         page_table[i, jnp.minimum(index, page_table.shape[1] - 1)], sink)
      block = rows[i, j * page:(j + 1) * page].reshape(1, 1, page * w)
      pool = jax.lax.dynamic_update_slice(pool, block, (layer, target, 0))
  return pool


def gather_pages(pool: jax.Array, layer: int, page_table: jax.Array, width: int
                 ) -> jax.Array:
  """The rows of the pages in `page_table` [B, N]: [B, N · page, width]. Tables hold pool
  pages only (padding is the sink), so the gather has no bounds masks."""
  b, n = page_table.shape
  rows = pool[layer].at[page_table].get(mode="promise_in_bounds")
  return rows.reshape(b, -1, width)


def key_block_pages(page: int, table_width: int) -> int:
  """Pages in one key block: KEY_BLOCK tokens, at most the table (both powers of two)."""
  return min(table_width, max(1, KEY_BLOCK // page))


def attend_in_blocks(block: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
                     num_blocks: jax.Array, block_tokens: int, q_positions: jax.Array,
                     scale: float) -> jax.Array:
  """softmax(scale · scores) · values over keys 0 .. num_blocks · block_tokens - 1, one
  block at a time with a running max and sum (online softmax), so the work follows the
  traced `num_blocks` (≥ 1) and the memory one block.

  block(i) -> (scores [B, H, S, T] float32 of block i's keys, T = block_tokens; values
  [B, H or 1, T, V]); a query at q_positions [B, S] sees the keys at positions ≤ its own
  (block 0 holds key 0, so every query sees one). Returns [B, H, S, V] float32.
  """
  def scored(i):
    scores, values = block(i)
    key_pos = i * block_tokens + jnp.arange(block_tokens)
    keep = key_pos[None, None, None, :] <= q_positions[:, None, :, None]
    return jnp.where(keep, scores * scale, jnp.finfo(_F32).min), values

  def mix(probs, values):
    return jnp.matmul(probs.astype(values.dtype), values, preferred_element_type=_F32)

  scores, values = scored(0)
  top = scores.max(-1)
  probs = jnp.exp(scores - top[..., None])
  state = (top, probs.sum(-1), mix(probs, values))

  def step(i, state):
    top, total, out = state
    scores, values = scored(i)
    new_top = jnp.maximum(top, scores.max(-1))
    shrink = jnp.exp(top - new_top)
    probs = jnp.exp(scores - new_top[..., None])
    return (new_top, total * shrink + probs.sum(-1),
            out * shrink[..., None] + mix(probs, values))

  _, total, out = jax.lax.fori_loop(1, num_blocks, step, state)
  return out / total[..., None]
