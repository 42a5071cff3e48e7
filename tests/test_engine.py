"""The inference engine: parity with transformers' generate, internal consistency, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from smallfour import configs
from smallfour.config import formats as config_formats
from smallfour.inference import forward
from smallfour.inference.cache import LatentCache
from smallfour.inference.engine import Engine, RequestError
from smallfour.inference.sampling import Sampling
from smallfour.nn.decoder import Transformer
from tests import oracle

PROMPTS = [list(range(3, 33)), [7, 1, 99, 4, 250, 31, 8]]  # 30 tokens, then 7


@pytest.mark.parametrize("plain", [False, True], ids=["hf_mscale_fold", "plain"])
def test_greedy_equals_transformers_generate(plain):
  """40 new tokens after a 30-token prompt cross original_max_position_embeddings=32."""
  hf_cfg = oracle.hf_config(first_k_dense_replace=1, n_group=2, topk_group=1,
                            eos_token_id=255)
  hf = oracle.hf_model(hf_cfg, seed=11, plain_softmax_scale=plain)
  cfg = config_formats.from_hf(hf_cfg.to_dict())
  if plain:
    cfg = cfg.replace(softmax_scale_mode="plain")
  engine = Engine(oracle.ours(hf, cfg), max_len=96)
  ours = engine.generate(PROMPTS, max_new_tokens=40)
  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                        eos_token_id=255, pad_token_id=0)[0, len(prompt):].tolist()
    forced = oracle.logits(hf, np.asarray([prompt + ref]))[0, len(prompt) - 1:-1]
    oracle.assert_clear_winners(forced, ref)
    assert got == ref


@pytest.fixture(scope="module")
def tiny():
  cfg = configs.resolve("tiny")
  model = Transformer(cfg, rngs=nnx.Rngs(3))
  return cfg, model, Engine(model, max_len=64)


@nnx.jit
def _forward(model, tokens):
  return model(tokens)


def test_greedy_is_argmax_of_teacher_forcing(tiny):
  _, model, engine = tiny
  out = engine.generate(PROMPTS, max_new_tokens=20)
  for prompt, got in zip(PROMPTS, out):
    logits = np.asarray(_forward(model, jnp.asarray([prompt + got]))[0, len(prompt) - 1:-1])
    # Cached decode and the full forward round differently: winners must be clear.
    oracle.assert_clear_winners(logits, got)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(0.9, top_k=40, top_p=0.8)],
                         ids=["greedy", "sampled"])
def test_while_loop_equals_stepwise(tiny, sampling):
  _, _, engine = tiny
  loop = engine.generate(PROMPTS, 12, sampling, seed=5)
  steps = list(engine.stream(PROMPTS, 12, sampling, seed=5))
  assert [[t for t in row if t is not None] for row in zip(*steps)] == loop
  assert engine.generate(PROMPTS, 12, sampling, seed=5) == loop  # deterministic


def test_chunked_prefill_equals_unchunked(tiny):
  cfg, model, _ = tiny
  tokens = jnp.asarray([list(range(1, 33)), list(range(40, 72))])
  lengths = jnp.asarray([32, 21])
  prefill = nnx.jit(forward.prefill, static_argnums=(3, 4))
  b_logits, b_cache = prefill(model, tokens, lengths, 64, 32)
  for chunk in (8, 2):  # 4 unrolled causal chunks; 16 chunks through lax.map
    a_logits, a_cache = prefill(model, tokens, lengths, 64, chunk)
    np.testing.assert_allclose(a_logits, b_logits, atol=1e-5)
    np.testing.assert_allclose(a_cache.latent, b_cache.latent, atol=1e-5)
  full = _forward(model, tokens)
  np.testing.assert_allclose(a_logits, full[jnp.arange(2), lengths - 1], atol=1e-4)


def test_decode_window_equals_whole_cache(tiny):
  """Attending over a window that holds every fed position changes nothing."""
  cfg, model, _ = tiny
  tokens = jnp.asarray([list(range(1, 33)), list(range(40, 72))])
  lengths = jnp.asarray([32, 21])
  _, cache = nnx.jit(forward.prefill, static_argnums=(3, 4))(model, tokens, lengths, 128, 32)
  step = nnx.jit(forward.decode_step, static_argnums=4)
  active = jnp.asarray([True, True])
  whole, whole_cache = step(model, jnp.asarray([5, 6]), cache, active, None)
  windowed, windowed_cache = step(model, jnp.asarray([5, 6]), cache, active, 48)
  np.testing.assert_allclose(windowed, whole, atol=1e-5)
  np.testing.assert_allclose(windowed_cache.latent, whole_cache.latent, atol=1e-5)


def test_stops_at_eos_and_full_cache(tiny):
  cfg, model, engine = tiny
  free = engine.generate([PROMPTS[1]], 10)[0]
  eos_model = nnx.merge(*nnx.split(model))
  eos_model.cfg = cfg.replace(eos_token_id=free[3])
  stopped = Engine(eos_model, max_len=64).generate([PROMPTS[1]], 10)[0]
  assert stopped == free[:free.index(free[3]) + 1]
  short = Engine(model, max_len=24).generate([list(range(1, 21))], 10)[0]
  assert len(short) == 24 - 20 + 1  # every slot filled, plus the last token sampled


def test_cache_bytes_per_token():
  big = configs.resolve("small4_119b")
  cache = jax.eval_shape(lambda: LatentCache.zeros(big, 1, 262144, jnp.bfloat16))
  assert cache.latent.shape[-1] * 2 == 640
  assert LatentCache.zeros(configs.resolve("tiny"), 2, 8, jnp.float32).bytes_per_token_per_layer \
      == (16 + 8) * 4


@pytest.mark.parametrize("prompts, max_new, match", [
    ([list(range(1, 70))], 4, "prompt 0 has 69 tokens; a sequence holds 64"),
    ([[1, 2], []], 4, "prompt 1 is empty"),
    ([[1, 131072, -3]], 4, r"prompt 0 has token ids outside \[0, 131072\): \[131072, -3\]"),
    ([], 4, "no prompts"),
    ([[1, 2]], 0, "max_new_tokens must be >= 1"),
])
def test_bad_requests_leave_the_engine_usable(tiny, prompts, max_new, match):
  _, _, engine = tiny
  with pytest.raises(RequestError, match=match):
    engine.generate(prompts, max_new)
  assert len(engine.generate([[1, 2, 3]], 3)[0]) == 3


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_bad_seed_leaves_the_engine_usable(tiny, seed):
  _, _, engine = tiny
  with pytest.raises(RequestError, match=r"seed must be in \[0, 2\*\*32\)"):
    list(engine.stream([[1, 2]], 2, seed=seed))
  assert len(engine.generate([[1, 2, 3]], 3, seed=2**32 - 1)[0]) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must lie in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), "top_k must be an integer >= 0"),
])
def test_bad_sampling(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Sampling(**kwargs)
