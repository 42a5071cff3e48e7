"""The inference engine: validated requests, bucketed prefill, insert, jitted generation.

The jit boundary is functional: the model is split once into (graphdef, state) and
every compiled function takes the state as an argument and merges inside, so weights
are never baked into executables. The cache is donated to every step. Prompt lengths
are padded to power-of-two buckets, so a handful of prefill shapes compile.

A prompt's images (preprocessed pixels, `smallfour.images`) are encoded once, before its
prefill, by their own compiled function (patch counts bucketed alike); prefill writes the
rows over the prompt's [IMG] tokens, and decode reads them from the cache like any token.

On a mesh, parameters stay where the rule table put them, the cache is split by the
table (`batch` over data×expert when the batch divides), every host-bound result
(tokens, logits, flags) is replicated so each process can read it, and everything is
traced under `jax.set_mesh` so the MoE runs expert-parallel.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from smallfour import sharding
from smallfour.inference import cache as cache_lib
from smallfour.inference import forward
from smallfour.inference.cache import LATENT_AXES, LatentCache
from smallfour.inference.sampling import Sampling, sample
from smallfour.nn import multimodal
from smallfour.nn.decoder import Transformer

MIN_BUCKET = 16
MIN_PATCH_BUCKET = 64
PAD = -1  # marks "no token" in generated outputs


class RequestError(ValueError):
  """A request the engine cannot serve; the engine stays usable."""


class Engine:
  """Generates from one model with a latent cache of `max_len` tokens per sequence."""

  def __init__(self, model: Transformer, *, max_len: int, prefill_chunk: int = 256,
               mesh: jax.sharding.Mesh | None = None):
    """`mesh`: where the model's parameters live (`sharding.place`/`init_sharded`/
    `restore_model(mesh=...)`); None for a single device."""
    self.cfg = model.cfg
    self.max_len = max_len
    self.prefill_chunk = prefill_chunk
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(self.state))
    if mesh is not None and not abstract:  # a no-op when already placed by the rule table
      self.state = jax.device_put(self.state, sharding.named_shardings(self.state, mesh))
    self.dtype = model.embedder.get_value().dtype
    self._prefill_jit = jax.jit(self._prefill_impl, static_argnames=("chunk",))
    self._prefill = sharding.under_mesh(self.mesh, self._prefill_jit)
    self._encode = self._jit(self._encode_impl)
    self._zeros = self._jit(self._zeros_impl, static_argnames=("batch",))
    self._insert = self._jit(self._insert_impl, donate_argnums=0)
    self._first = self._jit(self._first_impl, static_argnames=("sampling", "max_new_tokens"))
    self._step_jit = jax.jit(self._step_impl, static_argnames=("sampling", "window"),
                             donate_argnames=("cache",))
    self._step = sharding.under_mesh(self.mesh, self._step_jit)
    self._loop = self._jit(self._loop_impl,
                           static_argnames=("sampling", "max_new_tokens", "window"),
                           donate_argnames=("cache",))

  # ------------------------------------------------------------------ public API

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               seed: int = 0, images: Sequence[Sequence[np.ndarray]] | None = None) -> None:
    """Raises RequestError naming the offending prompt or image; nothing is computed.

    `images`: per prompt, its preprocessed images [C, H, W] in the order of their
    [IMG] tokens, which must number exactly their image tokens. A prompt without images
    is text: any [IMG] id in it is embedded as an ordinary token, as transformers does.
    """
    if not 0 <= seed < 2**32:
      raise RequestError(f"seed must be in [0, 2**32), got {seed}")
    if not prompts:
      raise RequestError("no prompts given")
    if max_new_tokens < 1:
      raise RequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise RequestError(f"prompt {i} is empty")
      if len(p) > self.max_len:
        raise RequestError(f"prompt {i} has {len(p)} tokens; the cache holds {self.max_len}")
      bad = [t for t in p if not 0 <= int(t) < self.cfg.vocab_size]
      if bad:
        raise RequestError(f"prompt {i} has token ids outside [0, {self.cfg.vocab_size}): "
                           f"{bad[:5]}")
    if images is not None and len(images) != len(prompts):
      raise RequestError(f"{len(images)} image lists for {len(prompts)} prompts")
    for i, p in enumerate(prompts):
      self._validate_images(i, p, images[i] if images else ())

  def _validate_images(self, i: int, prompt: Sequence[int], images: Sequence[np.ndarray]):
    vision = self.cfg.vision
    if not images:
      return
    if vision is None:
      raise RequestError(f"prompt {i} has images, but the model has no vision encoder")
    placeholders = sum(int(t) == vision.image_token_id for t in prompt)
    rows = 0
    for j, pixels in enumerate(images):
      try:
        r, c = multimodal.grid(pixels, vision)
      except ValueError as e:
        raise RequestError(f"prompt {i}, image {j}: {e}") from None
      rows += r * c
    if rows != placeholders:
      raise RequestError(f"prompt {i} has {placeholders} [IMG] tokens but its {len(images)} "
                         f"image(s) make {rows} image tokens")

  def prefill(self, prompt: Sequence[int], images: Sequence[np.ndarray] = ()
              ) -> tuple[jax.Array, LatentCache]:
    """One prompt (and its images) -> (next-token logits [1, V], its cache [B=1,
    T=max_len])."""
    s = self.bucket(len(prompt))
    tokens = np.zeros((1, s), np.int32)
    tokens[0, :len(prompt)] = prompt
    chunk = self.prefill_chunk if s % self.prefill_chunk == 0 else s
    return self._prefill(self.state, self._put(tokens),
                         self._put(np.asarray([len(prompt)], np.int32)),
                         self.encode_images(images), chunk=chunk)

  def encode_images(self, images: Sequence[np.ndarray]) -> jax.Array | None:
    """Preprocessed images -> their image rows [M, D] (M padded), None for no images."""
    if not images:
      return None
    per_token = self.cfg.vision.spatial_merge_size**2
    tokens = sum(int(np.prod(multimodal.grid(i, self.cfg.vision))) for i in images)
    bucket = max(MIN_PATCH_BUCKET, 1 << (tokens * per_token - 1).bit_length())
    batch = multimodal.pack(images, self.cfg.vision, pad_to=-(-bucket // per_token) * per_token)
    return self._encode(self.state, jax.tree.map(self._put, batch))

  def start(self, prompts: Sequence[Sequence[int]],
            images: Sequence[Sequence[np.ndarray]] | None = None
            ) -> tuple[jax.Array, LatentCache]:
    """Prefills every prompt and inserts it into its batch slot -> (logits [B, V], cache)."""
    cache = self._zeros(batch=len(prompts))
    logits = []
    for slot, prompt in enumerate(prompts):
      row_logits, one = self.prefill(prompt, images[slot] if images else ())
      cache = self._insert(cache, one, slot)
      logits.append(row_logits)
    return jnp.concatenate(logits), cache

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), seed: int = 0,
               images: Sequence[Sequence[np.ndarray]] | None = None) -> list[list[int]]:
    """Generates up to `max_new_tokens` per prompt, under one `jax.lax.while_loop`.

    A sequence stops at EOS (kept in its output), at `max_new_tokens`, or when its cache
    is full. `images`: per prompt, its preprocessed images (`validate`). Returns the
    generated ids per prompt (prompt excluded).
    """
    self.validate(prompts, max_new_tokens, seed, images)
    logits, cache = self.start(prompts, images)
    state = self._first(logits, cache.lengths, self._put(np.uint32(seed)),
                        sampling=sampling, max_new_tokens=max_new_tokens)
    out, _ = self._loop(self.state, cache, *state, sampling=sampling,
                        max_new_tokens=max_new_tokens,
                        window=self.window(prompts, max_new_tokens))
    return _trim(np.asarray(out))

  def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             images: Sequence[Sequence[np.ndarray]] | None = None
             ) -> Iterator[list[int | None]]:
    """The same generation one step at a time: yields each step's token per prompt
    (None once a prompt has stopped). Equal, token for token, to `generate`."""
    self.validate(prompts, max_new_tokens, seed, images)
    logits, cache = self.start(prompts, images)
    tokens, out, done, key = self._first(logits, cache.lengths,
                                         self._put(np.uint32(seed)),
                                         sampling=sampling, max_new_tokens=max_new_tokens)
    yield [int(t) for t in np.asarray(out[:, 0])]
    window = self.window(prompts, max_new_tokens)
    for i in range(1, max_new_tokens):
      if bool(jnp.all(done)):
        return
      was_done = np.asarray(done)
      tokens, cache, done, key = self._step(self.state, cache, tokens, done, key,
                                            sampling=sampling, window=window)
      yield [None if d else int(t) for t, d in zip(np.asarray(tokens), was_done)]

  def lower_step(self, batch: int, sampling: Sampling = Sampling()) -> jax.stages.Lowered:
    """The compiled decode step for `batch` sequences, lowered from abstract inputs.

    Nothing is allocated: the model may be abstract (`nnx.eval_shape`), e.g. the 119B
    release on a simulated mesh, to check that it partitions and what it needs per device
    (`.compile().memory_analysis()`).
    """
    whole = self._whole()
    cache = jax.eval_shape(functools.partial(self._zeros_impl, batch=batch))
    cache = LatentCache(_spec(cache.latent, self._cache_sharding(cache.latent.shape)),
                        _spec(cache.lengths, whole))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=whole)
    done = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=whole)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=whole)
    lower = sharding.under_mesh(self.mesh, self._step_jit.lower)
    return lower(self._abstract_state(), cache, tokens, done, key, sampling=sampling)

  def lower_prefill(self, length: int) -> jax.stages.Lowered:
    """The compiled prefill of one prompt padded to `length` tokens (a bucket, at most
    max_len), lowered from abstract inputs like `lower_step`."""
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32, sharding=self._whole())
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=self._whole())
    chunk = self.prefill_chunk if length % self.prefill_chunk == 0 else length
    lower = sharding.under_mesh(self.mesh, self._prefill_jit.lower)
    return lower(self._abstract_state(), tokens, lengths, chunk=chunk)

  def _abstract_state(self):
    """The parameters as ShapeDtypeStructs carrying their placement."""
    if self.mesh is None:
      return jax.tree.map(lambda a: _spec(a, None), self.state)
    return jax.tree.map(_spec, self.state, sharding.named_shardings(self.state, self.mesh))

  def _whole(self) -> jax.sharding.NamedSharding | None:
    return sharding.replicated(self.mesh) if self.mesh is not None else None

  def window(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """Cache positions decode must attend over: every position this request can feed
    (< longest prompt + max_new_tokens), bucketed so that few windows compile."""
    return self.bucket(max(len(p) for p in prompts) + max_new_tokens)

  def bucket(self, length: int) -> int:
    """The padded prefill length: the next power of two ≥ 16, capped at max_len."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), self.max_len)

  # ------------------------------------------------------------ mesh plumbing

  def _jit(self, fn, **kwargs):
    """`jax.jit(fn)`, called (and so traced) under this engine's mesh."""
    return sharding.under_mesh(self.mesh, jax.jit(fn, **kwargs))

  def _put(self, value):
    """A host value as a (replicated) input: every process passes the same one."""
    if self.mesh is None:
      return jnp.asarray(value)
    # Not device_put: on several processes the mesh's devices are not all addressable.
    value = np.asarray(value)
    return jax.make_array_from_process_local_data(sharding.replicated(self.mesh), value,
                                                  value.shape)

  def _replicated(self, *values):
    """Constrains results the host reads to be whole on every device (multi-host safe)."""
    if self.mesh is None:
      return values
    return tuple(jax.lax.with_sharding_constraint(v, sharding.replicated(self.mesh))
                 for v in values)

  def _cache_sharding(self, shape) -> jax.sharding.NamedSharding | None:
    """The latent's layout by the rule table (its batch split when it divides the mesh)."""
    if self.mesh is None:
      return None
    return sharding.logical_sharding(LATENT_AXES, shape, self.mesh)

  def _placed(self, cache: LatentCache) -> LatentCache:
    """The cache constrained to `_cache_sharding`, its lengths replicated."""
    if self.mesh is None:
      return cache
    latent = jax.lax.with_sharding_constraint(cache.latent,
                                              self._cache_sharding(cache.latent.shape))
    return LatentCache(latent, *self._replicated(cache.lengths))

  # ------------------------------------------------------------- compiled parts

  def _model(self, state) -> Transformer:
    return nnx.merge(self.graphdef, state)

  def _prefill_impl(self, state, tokens, lengths, image_rows=None, *, chunk):
    logits, cache = forward.prefill(self._model(state), tokens, lengths, self.max_len, chunk,
                                    image_rows)
    return *self._replicated(logits), self._placed(cache)

  def _encode_impl(self, state, images):
    return self._replicated(self._model(state).vision(images))[0]

  def _zeros_impl(self, *, batch):
    return self._placed(LatentCache.zeros(self.cfg, batch, self.max_len, self.dtype))

  def _insert_impl(self, batch_cache, one, slot):
    return self._placed(cache_lib.insert(batch_cache, one, slot))

  def _first_impl(self, logits, lengths, seed, *, sampling, max_new_tokens):
    """Samples the first token from the prefill logits; sets up the loop state."""
    key, sub = jax.random.split(jax.random.key(seed))
    tokens = sample(logits, sub, sampling)
    out = jnp.full((logits.shape[0], max_new_tokens), PAD, jnp.int32).at[:, 0].set(tokens)
    done = self._stops(tokens, lengths)
    return self._replicated(tokens, out, done, key)

  def _stops(self, tokens, lengths):
    """EOS was produced, or the cache has no room to feed the token back."""
    full = lengths >= self.max_len
    return full if self.cfg.eos_token_id is None else full | (tokens == self.cfg.eos_token_id)

  def _step_impl(self, state, cache, tokens, done, key, *, sampling, window=None):
    """Feeds `tokens` for rows not done and samples the next ones."""
    logits, cache = forward.decode_step(self._model(state), tokens, cache, ~done, window)
    key, sub = jax.random.split(key)
    nxt = jnp.where(done, PAD, sample(logits, sub, sampling))
    nxt, done, key = self._replicated(nxt, done | self._stops(nxt, cache.lengths), key)
    return nxt, self._placed(cache), done, key

  def _loop_impl(self, state, cache, tokens, out, done, key, *, sampling, max_new_tokens,
                 window):
    def cond(carry):
      i, _, _, _, done, _ = carry
      return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
      i, cache, tokens, out, done, key = carry
      tokens, cache, new_done, key = self._step_impl(state, cache, tokens, done, key,
                                                     sampling=sampling, window=window)
      return i + 1, cache, tokens, out.at[:, i].set(tokens), new_done, key

    carry = (jnp.int32(1), cache, tokens, out, done, key)
    _, cache, _, out, _, _ = jax.lax.while_loop(cond, body, carry)
    # Returning the cache lets XLA reuse the donated buffer.
    return *self._replicated(out), self._placed(cache)


def _spec(a, placement) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placement)


def _trim(out: np.ndarray) -> list[list[int]]:
  return [[int(t) for t in row if t != PAD] for row in out]
