"""The decoder block and the text model with its untied head (spec §2.1, §4), and the
vision path of a multimodal config (spec §5)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from smallfour.config import TextConfig
from smallfour.nn import multimodal, params
from smallfour.nn.mla import MLA
from smallfour.nn.moe import MLP, MoE
from smallfour.nn.norm import RMSNorm
from smallfour.nn.rope import PositionEncoding, encode_positions


class DecoderLayer(nnx.Module):
  """Pre-norm block: `h += MLA(norm(h)); h += FFN(norm(h))`, FFN a MoE or a dense MLP.

  One body (`_block`) behind the three ways the block runs: teacher-forced (`__call__`),
  prefill and one-token decode (the latter two read and write the latent cache).
  """

  def __init__(self, cfg: TextConfig, layer: int, *, rngs: nnx.Rngs, param_dtype: jnp.dtype,
               fp8: bool = False):
    self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.attn = MLA(cfg, rngs=rngs, param_dtype=param_dtype, fp8=fp8)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    if cfg.is_moe_layer(layer):
      self.ffn = MoE(cfg, rngs=rngs, param_dtype=param_dtype, fp8=fp8)
    else:
      self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, param_dtype=param_dtype,
                     fp8=fp8)

  def __call__(self, h: jax.Array, pos: PositionEncoding, mask: jax.Array) -> jax.Array:
    """Teacher-forced, expanded attention. h: [B, S, D], mask: [B, S, S] -> [B, S, D]."""
    return self._block(h, lambda a: (self.attn(a, pos, mask), None))[0]

  def prefill(self, h: jax.Array, pos: PositionEncoding, positions: jax.Array,
              valid: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Chunked prefill (`MLA.prefill`). Returns (h [B, S, D], cache rows [B, S, R + Dr])."""
    return self._block(h, lambda a: self.attn.prefill(a, pos, positions, valid, chunk))

  def decode(self, h: jax.Array, pos: PositionEncoding, latent: jax.Array, layer: int,
             write_at: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token per sequence (`MLA.decode`). Returns (h [B, 1, D], cache [L, B, T, R + Dr])."""
    return self._block(h, lambda a: self.attn.decode(a, pos, latent, layer, write_at, mask))

  def paged(self, h: jax.Array, pos: PositionEncoding, positions: jax.Array, pool: jax.Array,
            layer: int, page_table: jax.Array) -> tuple[jax.Array, jax.Array]:
    """New tokens against the paged cache (`MLA.paged`). Returns (h, the updated pool)."""
    return self._block(h, lambda a: self.attn.paged(a, pos, positions, pool, layer, page_table))

  def _block(self, h: jax.Array, attend: Callable[[jax.Array], tuple[jax.Array, Any]]
             ) -> tuple[jax.Array, Any]:
    """The block's one body; `attend` maps the normed input to (attention output, extra)."""
    out, extra = attend(self.input_norm(h))
    h = h + out
    return h + self.ffn(self.post_attn_norm(h)), extra


class Transformer(nnx.Module):
  """Token embedding, `num_layers` decoder blocks, final norm and an untied LM head.

  The activation dtype is the parameters' dtype; cast the state to change it. With `fp8`
  the linears the release stores in e4m3 (attention, experts, shared and dense MLPs) are
  held FP8-resident (`nn/fp8.py`) and dequantized to `param_dtype` where they are used;
  the embedding, norms, router and LM head stay in `param_dtype`.
  """

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, param_dtype: jnp.dtype = jnp.float32,
               fp8: bool = False):
    self.cfg = cfg
    d, v = cfg.hidden_size, cfg.vocab_size
    # N(0, 1) rows keep the first norm's input at unit scale.
    self.embedder = params.weight(rngs, (v, d), ("vocab", "embed"), fan_in=1, dtype=param_dtype)
    self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, param_dtype=param_dtype, fp8=fp8)
                            for i in range(cfg.num_layers)])
    self.final_norm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
    self.lm_head = params.weight(rngs, (d, v), ("embed", "vocab"), fan_in=d, dtype=param_dtype)
    # Built last, so the text weights draw the same values with or without it.
    self.vision = None if cfg.vision is None else multimodal.VisionPath(
        cfg.vision, d, rngs=rngs, param_dtype=param_dtype)

  def embed(self, tokens: jax.Array, image_rows: jax.Array | None = None) -> jax.Array:
    """tokens: [B, S] int -> [B, S, D] (no embedding scaling); `image_rows` [M, D]
    (`self.vision`'s output) replace the [IMG] tokens' embeddings, in order."""
    h = jnp.take(self.embedder[...], tokens, axis=0)
    if image_rows is None:
      return h
    return multimodal.merge(h, tokens, image_rows, self.cfg.vision.image_token_id)

  def positions(self, positions: jax.Array, dtype: jnp.dtype) -> PositionEncoding:
    return encode_positions(positions, self.cfg.qk_rope_head_dim, self.cfg.rope, dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               valid: jax.Array | None = None,
               images: multimodal.ImageBatch | None = None) -> jax.Array:
    """Teacher-forced forward pass over whole sequences.

    tokens: [B, S] int; positions: [B, S] (default `arange(S)`); valid: [B, S] bool marks
    real (non-padding) tokens, default all; images: the prompt's images, packed in the
    order of their [IMG] tokens. Returns logits [B, S, V] in the activation dtype.
    """
    b, s = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = positions[:, None, :] <= positions[:, :, None]  # causal by position: [B, S, T]
    if valid is not None:
      mask &= valid[:, None, :]
    h = self.embed(tokens, None if images is None else self.vision(images))
    pos = self.positions(positions, h.dtype)
    for layer in self.layers:
      h = layer(h, pos, mask)
    return self.logits(h)

  def logits(self, h: jax.Array) -> jax.Array:
    """h: [B, S, D] final hidden states (before the final norm) -> [B, S, V]."""
    return jnp.einsum("bsd,dv->bsv", self.final_norm(h), self.lm_head[...])
