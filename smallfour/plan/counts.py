"""Per-device bytes and FLOPs of a serving configuration, counted from shapes.

Nothing is compiled or allocated: parameter shapes come from the abstract model, their
split from the rule table (`sharding.py`) on a mesh of the given axis sizes. These are the
"counted" figures of a plan (checked against the compiler's argument bytes on TPU, the
only figures on GPU) and the "unavoidable" bytes a step must read, the denominator of
`bytes_accessed / unavoidable` and of the bandwidth ceiling.

The cache is the engine's page pool (`inference/paged.py`): `cache_tokens` tokens in pages
of `page_size`, plus the sink page, held whole by every device (the rule table replicates
`pages` and `page`), so its bytes per device do not shrink with the mesh. A step reads its
sequences' windows out of it, split over the batch axes like the rest of its activations.

Names: B sequences, T tokens a sequence holds (max_len), W a prefill chunk's window,
C chunk tokens, E experts (K per token).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour import sharding, summary
from smallfour.config import TextConfig
from smallfour.inference.cache import LATENT_AXES, LatentCache
from smallfour.inference.paged import (POOL_AXES, POOL_PAGE_MULTIPLE, bucket, chunk_bucket,
                                       pool_shape)


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
  """A device-free mesh of these axis sizes, for shard shapes."""
  return jax.sharding.AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES),
                                   sharding.MESH_AXES)


def _shard_size(shape: tuple[int, ...], spec: jax.sharding.PartitionSpec,
                sizes: dict[str, int]) -> int:
  size = 1
  for i, dim in enumerate(shape):
    entry = spec[i] if i < len(spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    size *= dim // math.prod(sizes[a] for a in axes)
  return size


@dataclasses.dataclass(frozen=True)
class WeightBytes:
  """Per-device parameter bytes by role."""

  embedding: int  # the table: only B rows are read per step
  routed: int  # routed experts (all local ones)
  vision: int  # the vision encoder: images are encoded before prefill, by their own step
  other: int  # everything else (attention, norms, router, shared/dense MLPs, LM head)

  @property
  def total(self) -> int:
    return self.embedding + self.routed + self.vision + self.other


def weight_bytes(state: nnx.State, sizes: dict[str, int]) -> WeightBytes:
  """Bytes of `state` (abstract parameters) one device holds under the rule table."""
  specs = dict(nnx.to_flat_state(sharding.partition_specs(state)))
  groups = {"embedding": 0, "routed": 0, "vision": 0, "other": 0}
  for path, var in nnx.to_flat_state(state):
    # int4 codes are half a byte (numpy's int4 takes one).
    bits = (jnp.iinfo(var.dtype).bits if jnp.issubdtype(var.dtype, jnp.integer)
            else 8 * np.dtype(var.dtype).itemsize)
    nbytes = _shard_size(var.shape, specs[path].get_value(), sizes) * bits // 8
    role = ("embedding" if path[0] == "embedder" else "vision" if path[0] == "vision" else
            "routed" if "experts" in path else "other")
    groups[role] += nbytes
  return WeightBytes(**groups)


def cache_bytes(cfg: TextConfig, sizes: dict[str, int], batch: int, length: int,
                itemsize: int, *, held: bool = True) -> int:
  """Bytes of the latent cache one device holds (`LatentCache.shape`), or with
  `held=False` of just `length` tokens per sequence."""
  shape = LatentCache.shape(cfg, batch, length)
  if not held:
    shape = (*shape[:2], length, shape[3])
  spec = sharding.logical_spec(LATENT_AXES, shape, abstract_mesh(sizes))
  return _shard_size(shape, spec, sizes) * itemsize


def pool_bytes(cfg: TextConfig, sizes: dict[str, int], num_pages: int, page_size: int,
               itemsize: int) -> int:
  """Bytes of the page pool (`num_pages` pages + the sink) one device holds."""
  shape = pool_shape(cfg, num_pages, page_size)
  spec = sharding.logical_spec(POOL_AXES, shape, abstract_mesh(sizes))
  return _shard_size(shape, spec, sizes) * itemsize


def cached_token_bytes(cfg: TextConfig, sizes: dict[str, int], itemsize: int) -> int:
  """Bytes one more cached token costs a device (its latent in every layer): the pool is
  replicated, so every device pays all of it."""
  shape = (cfg.num_layers, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
  spec = sharding.logical_spec(POOL_AXES, shape, abstract_mesh(sizes))
  return _shard_size(shape, spec, sizes) * itemsize


def context_tokens(free_bytes: float, token_bytes: float, page_size: int) -> int:
  """Cached tokens a pool in `free_bytes` holds: whole pages, after the sink and the
  padding to whole tiles (`paged.pool_shape`)."""
  rows = int(free_bytes // (token_bytes * page_size)) // POOL_PAGE_MULTIPLE * POOL_PAGE_MULTIPLE
  return max(0, rows - 1) * page_size


def chunk_tokens(max_num_batched_tokens: int, prefill_len: int, page_size: int
                 ) -> tuple[int, int]:
  """(tokens, padded) of the longest prompt chunk the engine runs: a step's budget, or
  the whole prompt if shorter; padded to whole pages (`paged.chunk_bucket`), the shape
  that is compiled."""
  tokens = min(max_num_batched_tokens, prefill_len)
  return tokens, chunk_bucket(tokens, page_size)


def local_experts_used(cfg: TextConfig, sizes: dict[str, int], tokens: int) -> float:
  """Expected distinct experts of one device that `tokens` tokens (in all) route to.

  The MoE gathers its data group's tokens (tokens / data) over `expert`; each device
  owns E / expert of the experts, each missed by all of them with probability
  (1 - K/E)^(tokens / data) under uniform routing.
  """
  group = max(1, tokens // sizes["data"])
  local = cfg.num_experts // sizes["expert"]
  return local * (1.0 - (1.0 - cfg.num_experts_per_tok / cfg.num_experts) ** group)


def unavoidable_bytes(cfg: TextConfig, weights: WeightBytes, sizes: dict[str, int],
                      tokens: int, cache: int, itemsize: int) -> float:
  """What one device must move for a step over `tokens` tokens in all.

  Every weight it holds except the embedding table, the vision encoder and unused
  experts, one embedding row per token, the routed experts its share of the tokens use,
  and `cache` bytes of cache (the windows read, the rows written).
  """
  used = local_experts_used(cfg, sizes, tokens) / (cfg.num_experts // sizes["expert"])
  return (weights.other + tokens * cfg.hidden_size * itemsize + used * weights.routed + cache)


def prefill_flops_per_device(cfg: TextConfig, sizes: dict[str, int], tokens: int,
                             window: int | None = None) -> float:
  """Matmul FLOPs of one device in a prefill of the last `tokens` tokens of a
  `window`-long prompt (default the whole prompt): its projections, attention over every
  key up to its own position, and the LM head once.

  The routed experts' FLOPs are split over expert × tensor; the rest (attention, shared
  and dense MLPs, LM head) only over tensor: one sequence does not split over batch axes.
  """
  window = tokens if window is None else window
  total = summary.prefill_flops(cfg, window) - summary.prefill_flops(cfg, window - tokens)
  total += 2 * cfg.hidden_size * cfg.vocab_size if tokens < window else 0
  moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  routed = 2 * tokens * cfg.num_experts_per_tok * 3 * cfg.hidden_size * (
      cfg.moe_intermediate_size) * moe_layers
  return (total - routed) / sizes["tensor"] + routed / (sizes["expert"] * sizes["tensor"])


def counted(cfg: TextConfig, state: nnx.State, sizes: dict[str, int], *, batch: int,
            max_len: int, prefill_len: int, itemsize: int, cache_tokens: int | None = None,
            page_size: int = 16, max_num_batched_tokens: int = 512) -> dict[str, Any]:
  """The from-shapes figures of a decode step (B = batch sequences over T = max_len
  tokens each) and of a prefill chunk (the last chunk of a `prefill_len`-token prompt).

  Both steps take the pool of `cache_tokens` tokens (default B × T) as `cache_bytes`. A
  step's `weights_bytes` are the weights it takes: all but the vision encoder's, which are
  held beside them (`vision_bytes`) for the step that encodes images. Unavoidable: decode
  reads each sequence's T-token window (its share of the batch); a chunk reads its
  sequence's window (up to `prefill_len`) and writes its own rows.
  """
  cache_tokens = batch * max_len if cache_tokens is None else cache_tokens
  num_pages = cache_tokens // page_size
  chunk, padded = chunk_tokens(max_num_batched_tokens, prefill_len, page_size)
  weights = weight_bytes(state, sizes)
  text = weights.total - weights.vision
  pool = pool_bytes(cfg, sizes, num_pages, page_size, itemsize)
  windows = cache_bytes(cfg, sizes, batch, max_len, itemsize, held=False)
  window = cache_bytes(cfg, sizes, 1, prefill_len, itemsize, held=False)
  written = cache_bytes(cfg, sizes, 1, chunk, itemsize, held=False)
  return {
      "vision_bytes": weights.vision,
      "pool": {"cache_tokens": cache_tokens, "pages": num_pages, "page_size": page_size,
               "bytes": pool, "token_bytes": cached_token_bytes(cfg, sizes, itemsize)},
      "chunk_tokens": chunk, "chunk_padded": padded,
      "decode": {"weights_bytes": text, "cache_bytes": pool, "window_bytes": windows,
                 "unavoidable_bytes": unavoidable_bytes(cfg, weights, sizes, batch,
                                                        windows, itemsize)},
      "prefill": {"weights_bytes": text, "cache_bytes": pool, "window_bytes": window,
                  "unavoidable_bytes": unavoidable_bytes(cfg, weights, sizes, chunk,
                                                         window + written, itemsize),
                  "flops": prefill_flops_per_device(cfg, sizes, chunk, prefill_len)},
  }
