"""The paged latent cache on the device, and the compiled passes over it.

The cache is one pool `[L, pages + 1, page · (R + Dr)]`, each page's rows end to end
(`nn.paged_attention` says why). The last page is the sink: padding in page tables points
there, and writes that must not land go there; it is never read as a sequence's. Every pass
is "new tokens against what is cached": a decode step feeds one token per sequence, a
prompt chunk feeds up to C tokens of one sequence starting on a page boundary; both write
their latents into the sequence's pages. Decode attends over the first N pages of each
page table (N bucketed to a power of two); a chunk reads its window one key block at a
time up to its last token (`MLA.attend_pages`), so its table can be as wide as the longest
sequence at no cost. Prefill from a non-empty cache is this one primitive: chunked
prefill, prefix caching, multi-turn chats and recompute after preemption.

Shapes are bucketed (decode windows and image rows to powers of two, chunks to quarter
octaves: `chunk_bucket`), so a handful compile, and no shape depends on `max_len` other
than through the log of the longest window. The jit boundary is functional: the model's
state is an argument, the pool is donated to every pass.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour import sharding
from smallfour.config import TextConfig
from smallfour.inference.forward import next_logits
from smallfour.inference.sampling import Sampling, SamplingRows, sample_rows
from smallfour.nn import multimodal
from smallfour.nn.decoder import Transformer

# Logical axes of the pool, placed by the rule table in smallfour/sharding.py.
POOL_AXES = ("layers", "pages", "page")
MIN_PATCH_BUCKET = 64


# The pool's page count (with the sink) is rounded up to this: XLA:TPU tiles the
# second-minor axis by 8 rows (16 for bf16, 32 for 8-bit types); off that multiple it
# lays the pool out with another axis there and copies it whole around every update.
POOL_PAGE_MULTIPLE = 32


def pool_shape(cfg: TextConfig, num_pages: int, page_size: int) -> tuple[int, int, int]:
  """[L, pages + 1 (the sink, the last), page · (R + Dr)], pages + 1 rounded up to a
  multiple of POOL_PAGE_MULTIPLE (the pages in between are never used)."""
  rows = -(-(num_pages + 1) // POOL_PAGE_MULTIPLE) * POOL_PAGE_MULTIPLE
  return (cfg.num_layers, rows, page_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim))


def forward(model: Transformer, pool: jax.Array, tokens: jax.Array, positions: jax.Array,
            page_table: jax.Array, last: jax.Array, image_rows: jax.Array | None = None
            ) -> tuple[jax.Array, jax.Array]:
  """tokens, positions: [B, S]; page_table: [B, N]; last: [B] the index in S whose
  next-token logits are returned; image_rows: [M, D] written over the [IMG] tokens in order.
  Returns (logits [B, V], the updated pool)."""
  h = model.embed(tokens, image_rows)
  pos = model.positions(positions, h.dtype)
  for i, layer in enumerate(model.layers):
    h, pool = layer.paged(h, pos, positions, pool, i, page_table)
  return next_logits(model, jnp.take_along_axis(h, last[:, None, None], axis=1)), pool


def bucket(n: int, least: int = 1) -> int:
  """The next power of two ≥ max(n, least)."""
  return max(least, 1 << (max(n, 1) - 1).bit_length())


def chunk_bucket(tokens: int, page_size: int) -> int:
  """The padded length of a prompt chunk: whole pages, rounded up to a quarter octave
  (1–8 pages exactly, then 10, 12, 14, 16, 20, 24, …), so at most 25% is padding where
  powers of two pad up to 100% (a chunk's cost follows its padded length)."""
  pages = -(-max(tokens, 1) // page_size)
  step = max(1, bucket(pages) // 8)
  return -(-pages // step) * step * page_size


def chunk_sizes(max_tokens: int, page_size: int) -> list[int]:
  """Every `chunk_bucket` of 1 .. max_tokens tokens, ascending: the chunk shapes."""
  sizes, n = [], page_size
  while n <= chunk_bucket(max_tokens, page_size):
    sizes.append(chunk_bucket(n, page_size))
    n = sizes[-1] + page_size
  return sizes


class PagedModel:
  """A model's compiled passes over a pool of `num_pages` pages of `page_size` tokens."""

  def __init__(self, model: Transformer, *, num_pages: int, page_size: int,
               mesh: jax.sharding.Mesh | None = None):
    """`mesh`: where the model's parameters live (`sharding.place`/`init_sharded`/
    `restore_model(mesh=...)`); None for a single device."""
    self.cfg, self.mesh = model.cfg, mesh
    self.num_pages, self.page_size = num_pages, page_size
    self.sink = pool_shape(self.cfg, num_pages, page_size)[1] - 1
    self.graphdef, self.state = nnx.split(model)
    abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(self.state))
    if mesh is not None and not abstract:  # a no-op when already placed by the rule table
      self.state = jax.device_put(self.state, sharding.named_shardings(self.state, mesh))
    self.dtype = model.embedder.get_value().dtype
    self._decode_jit = jax.jit(self._decode_impl, donate_argnums=1)
    self._extend_jit = jax.jit(self._extend_impl, donate_argnums=1)
    self._decode = sharding.under_mesh(mesh, self._decode_jit)
    self._extend = sharding.under_mesh(mesh, self._extend_jit)
    self._encode = sharding.under_mesh(mesh, jax.jit(self._encode_impl))
    self._zeros = sharding.under_mesh(mesh, jax.jit(self._zeros_impl))

  @property
  def pool_bytes(self) -> int:
    return int(np.prod(pool_shape(self.cfg, self.num_pages, self.page_size))) * \
        jnp.dtype(self.dtype).itemsize

  def zeros(self) -> jax.Array:
    return self._zeros()

  def decode(self, pool: jax.Array, tokens: np.ndarray, positions: np.ndarray,
             page_table: np.ndarray, keys: np.ndarray, rows: SamplingRows
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feeds tokens [B] at positions [B] (rows whose page table is all sink write nothing
    that is read) and samples each row's next token with its key [B, 2] uint32.
    Returns (pool, next tokens [B], advanced keys [B, 2])."""
    return self._decode(self.state, pool, *self.put(tokens, positions, page_table, keys,
                                                     rows))

  def extend(self, pool: jax.Array, tokens: np.ndarray, start: int, page_table: np.ndarray,
             key: np.ndarray, row: SamplingRows, image_rows: jax.Array | None = None,
             image_offset: int = 0, width: int | None = None
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feeds one sequence's prompt tokens [n] at positions start .. start + n - 1 (`start`
    a multiple of the page size), padded to whole pages (`chunk_bucket`), and samples from
    the last one's logits. page_table: [N] its pages. image_rows: [M, D] its images' rows
    (`encode`), of which the chunk's [IMG] tokens take the ones from `image_offset` on.
    width: the table's padded width (a power of two ≥ the pages used; the engine passes
    its longest sequence's so that one shape serves every chunk of a size).
    Returns (pool, the sampled token [1], the advanced key [1, 2])."""
    n, p = len(tokens), self.page_size
    size = chunk_bucket(n, p)
    padded = np.zeros((1, size), np.int32)
    padded[0, :n] = tokens
    width = width or bucket(-(-(start + n) // p))  # padding pages past it go to the sink
    if width < len(page_table) or width & (width - 1):
      raise ValueError(f"width {width} is not a power of two ≥ the {len(page_table)} pages")
    table = np.full((1, width), self.sink, np.int32)
    table[0, :len(page_table)] = page_table
    *inputs, offset = self.put(padded, np.int32(start), np.int32(n - 1), table, key[None],
                                row, np.int32(image_offset))
    images = None if image_rows is None else (image_rows, offset)
    return self._extend(self.state, pool, *inputs, images)

  def encode(self, images: Sequence[np.ndarray]) -> jax.Array:
    """Preprocessed images [C, H, W] -> their rows [M, D], M padded to a bucket."""
    per_token = self.cfg.vision.spatial_merge_size**2
    tokens = sum(int(np.prod(multimodal.grid(i, self.cfg.vision))) for i in images)
    patches = bucket(tokens * per_token, MIN_PATCH_BUCKET)
    batch = multimodal.pack(images, self.cfg.vision, pad_to=-(-patches // per_token) * per_token)
    return self._encode(self.state, self.put(batch)[0])

  # ------------------------------------------------------------ compiled parts

  def _decode_impl(self, state, pool, tokens, positions, page_table, keys, rows):
    model = nnx.merge(self.graphdef, state)
    logits, pool = forward(model, pool, tokens[:, None], positions[:, None], page_table,
                           jnp.zeros_like(tokens))
    split = jax.vmap(jax.random.split)(jax.random.wrap_key_data(keys))  # [B, 2]
    drawn = sample_rows(logits, split[:, 1], rows)
    return self._placed(pool), *self._whole(drawn, jax.random.key_data(split[:, 0]))

  def _extend_impl(self, state, pool, tokens, start, last, page_table, key, row, images):
    model = nnx.merge(self.graphdef, state)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    image_rows = None
    if images is not None:  # the rows of this chunk's [IMG] tokens, in order
      rows, offset = images
      rows = jnp.pad(rows, ((0, tokens.shape[1]), (0, 0)))
      image_rows = jax.lax.dynamic_slice_in_dim(rows, offset, tokens.shape[1])
    logits, pool = forward(model, pool, tokens, positions, page_table, last[None], image_rows)
    split = jax.random.split(jax.random.wrap_key_data(key[0]))
    drawn = sample_rows(logits, split[1][None], row)
    return self._placed(pool), *self._whole(drawn, jax.random.key_data(split[0])[None])

  def _encode_impl(self, state, images):
    return self._whole(nnx.merge(self.graphdef, state).vision(images))[0]

  def _zeros_impl(self):
    shape = pool_shape(self.cfg, self.num_pages, self.page_size)
    return self._placed(jnp.zeros(shape, self.dtype))

  # ------------------------------------------------------------ mesh plumbing

  def put(self, *values) -> tuple:
    """Host values (arrays or pytrees of them) as the passes' (replicated) inputs: every
    process passes the same ones. In one process they stay numpy arrays, which jit moves
    to the devices itself in ~10 µs; `jnp.asarray` or `device_put` took ~50 µs per array,
    a few % of a small model's decode step."""
    values = jax.tree.map(np.asarray, values)
    if self.mesh is None or jax.process_count() == 1:
      return values
    # On several processes the mesh's devices are not all addressable.
    whole = sharding.replicated(self.mesh)
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(whole, v, v.shape),
                        values)

  def _whole(self, *values) -> tuple[jax.Array, ...]:
    """Results the host reads, whole on every device (multi-host safe)."""
    if self.mesh is None:
      return values
    return tuple(jax.lax.with_sharding_constraint(v, sharding.replicated(self.mesh))
                 for v in values)

  def _placed(self, pool: jax.Array) -> jax.Array:
    """The pool laid out by the rule table."""
    if self.mesh is None:
      return pool
    return jax.lax.with_sharding_constraint(
        pool, sharding.logical_sharding(POOL_AXES, pool.shape, self.mesh))

  # ------------------------------------------------------------ plans

  def lower_decode(self, batch: int, window: int) -> jax.stages.Lowered:
    """The decode step of `batch` sequences attending over `window` tokens, lowered from
    abstract inputs: nothing is allocated, the model may be abstract (`nnx.eval_shape`)."""
    n = bucket(-(-window // self.page_size))
    whole = self._whole_sharding()
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)  # noqa: E731
    keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=whole)
    rows = self._abstract_rows(batch)
    lower = sharding.under_mesh(self.mesh, self._decode_jit.lower)
    return lower(self._abstract_state(), self._abstract_pool(), ints(batch), ints(batch),
                 ints(batch, n), keys, rows)

  def lower_extend(self, chunk: int, window: int) -> jax.stages.Lowered:
    """A prompt chunk of `chunk` tokens (whole pages) whose cache reaches `window` tokens."""
    n = bucket(-(-window // self.page_size))
    whole = self._whole_sharding()
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=whole)  # noqa: E731
    key = jax.ShapeDtypeStruct((1, 2), jnp.uint32, sharding=whole)
    row = self._abstract_rows(1)
    lower = sharding.under_mesh(self.mesh, self._extend_jit.lower)
    return lower(self._abstract_state(), self._abstract_pool(), ints(1, chunk), ints(),
                 ints(), ints(1, n), key, row, None)

  def _abstract_rows(self, batch: int) -> SamplingRows:
    whole = self._whole_sharding()
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole),
                        SamplingRows.of([Sampling()] * batch))

  def _whole_sharding(self):
    return sharding.replicated(self.mesh) if self.mesh is not None else None

  def _abstract_pool(self) -> jax.ShapeDtypeStruct:
    shape = pool_shape(self.cfg, self.num_pages, self.page_size)
    placement = None if self.mesh is None else sharding.logical_sharding(POOL_AXES, shape,
                                                                         self.mesh)
    return jax.ShapeDtypeStruct(shape, self.dtype, sharding=placement)

  def _abstract_state(self):
    """The parameters as ShapeDtypeStructs carrying their placement."""
    spec = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    if self.mesh is None:
      return jax.tree.map(lambda a: spec(a, None), self.state)
    return jax.tree.map(spec, self.state, sharding.named_shardings(self.state, self.mesh))
