"""`sample` against an independent numpy reference of the kept tokens and their frequencies.

`sample_rows` (parameters and keys per row) is held to the same reference, with every row
alike and with rows that mix greedy, temperature, top-k and top-p in one batch.

The reference follows the definitions in float64: logits / temperature; top_k keeps every
token at least as large as the k-th largest (ties with it included); top_p then sorts the
top-k renormalised distribution and keeps each token whose mass before it is below top_p,
with every token tied with the last one kept; the draw follows the softmax of the kept logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats  # the test extra (setup.cfg)

from smallfour.inference.sampling import Sampling, SamplingRows, sample, sample_rows

DRAWS = 40_000  # keys per case
# Logits on a 0.1 grid: any two are equal or ~0.1 apart, so no case hangs on a near-tie.
RANDOM = np.round(np.random.default_rng(0).standard_normal((2, 16)), 1).astype(np.float32)
TIES = np.array([3.0, 3.0, 2.0, 1.5, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -1.5, -2.0, -2.0,
                 -2.5, -3.0], np.float32)


def reference(logits: np.ndarray, s: Sampling) -> np.ndarray:
  """The distribution `sample` should draw from: [V] float64, zero outside the kept set."""
  z = logits.astype(np.float64) / s.temperature
  keep = np.ones(z.shape, bool)
  if s.top_k:
    keep &= z >= np.sort(z)[::-1][min(s.top_k, z.size) - 1]
  if s.top_p < 1:
    order = np.argsort(-z, kind="stable")
    p = np.where(keep, np.exp(z - z.max()), 0.0)[order]
    p /= p.sum()
    before = np.cumsum(p) - p
    # A mass this close to top_p would test float32 rounding, not the rule (the first
    # token's, 0, is exact in any arithmetic).
    assert np.abs(before[1:] - s.top_p).min() > 1e-4, "a token sits on the top_p edge"
    keep &= z >= z[order][before < s.top_p].min()
  probs = np.where(keep, np.exp(z - z.max()), 0.0)
  return probs / probs.sum()


def draws(logits: np.ndarray, s: Sampling) -> np.ndarray:
  """DRAWS samples of every row of `logits` [R, V], one key each: [DRAWS, R]."""
  keys = jax.random.split(jax.random.key(0), DRAWS)
  return np.asarray(jax.jit(jax.vmap(lambda key: sample(jnp.asarray(logits), key, s)))(keys))


def draws_rows(logits: np.ndarray, rows: list[Sampling]) -> np.ndarray:
  """`draws` through `sample_rows`, row r with `rows[r]` and its own keys: [DRAWS, R]."""
  keys = jax.random.split(jax.random.key(0), (DRAWS, len(rows)))
  params = SamplingRows.of(rows)
  return np.asarray(jax.jit(jax.vmap(
      lambda key: sample_rows(jnp.asarray(logits), key, params)))(keys))


def assert_drawn_from(tokens: np.ndarray, probs: np.ndarray) -> None:
  """Every draw is kept, every kept token is drawn, counts fit `probs` (chi-square)."""
  kept = np.flatnonzero(probs)
  counts = np.bincount(tokens, minlength=probs.size)
  assert set(np.flatnonzero(counts)) <= set(kept), "drew a filtered-out token"
  expected = len(tokens) * probs[kept]
  assert expected.min() >= 20, "test logits: a kept token is too rare to test"
  assert counts[kept].min() > 0, "a kept token is never drawn"
  if len(kept) > 1:
    chi2 = ((counts[kept] - expected) ** 2 / expected).sum()
    # The keys are fixed, so this is deterministic; 1e-6 leaves room for another PRNG.
    assert chi2 < stats.chi2.isf(1e-6, len(kept) - 1), (chi2, counts[kept], expected)


@pytest.mark.parametrize("s", [
    Sampling(1.0),
    Sampling(1.0, top_k=100),  # k beyond the vocabulary
    Sampling(0.7, top_k=5),
    Sampling(1.2, top_k=6, top_p=1.0),
    Sampling(1.5, top_p=0.8),
    Sampling(0.9, top_k=6, top_p=0.7),
    Sampling(0.5, top_k=8, top_p=0.95),
    Sampling(2.0, top_k=1),
    Sampling(0.8, top_p=1e-6),
], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["sample", "sample_rows"])
def test_draws_follow_the_reference(s, per_row):
  rows = np.concatenate([RANDOM, TIES[None]])
  got = draws_rows(rows, [s] * len(rows)) if per_row else draws(rows, s)
  for row, tokens in zip(rows, got.T):
    assert_drawn_from(tokens, reference(row, s))


def test_rows_with_mixed_parameters_each_follow_their_own():
  mixed = [Sampling(), Sampling(1.5, top_p=0.8), Sampling(0.7, top_k=5),
           Sampling(0.9, top_k=6, top_p=0.7), Sampling(1.0)]
  rows = np.concatenate([RANDOM, TIES[None], RANDOM[:1], TIES[None]])
  got = draws_rows(rows, mixed)
  assert (got[:, 0] == np.argmax(rows[0])).all()
  for row, s, tokens in zip(rows[1:], mixed[1:], got.T[1:]):
    assert_drawn_from(tokens, reference(row, s))


def _ties_top_p(temperature: float, tied: int, top_k: int = TIES.size) -> float:
  """A top_p reached halfway through TIES[tied - 1], so that TIES[tied], equal to it, is kept
  by the tie rule alone (TIES is sorted, so top_k keeps its first top_k)."""
  p = np.exp(TIES[:top_k].astype(np.float64) / temperature)
  p /= p.sum()
  return float(p[:tied].sum() - p[tied - 1] / 2)


@pytest.mark.parametrize("s, kept", [
    (Sampling(1.0, top_k=1), [0, 1]),
    (Sampling(1.0, top_p=1e-6), [0, 1]),
    (Sampling(1.0, top_k=4), [0, 1, 2, 3, 4]),
    (Sampling(1.0, top_k=5), [0, 1, 2, 3, 4]),
    (Sampling(1.0, top_p=_ties_top_p(1.0, 4)), [0, 1, 2, 3, 4]),
    (Sampling(0.6, top_k=12, top_p=_ties_top_p(0.6, 4, top_k=12)), [0, 1, 2, 3, 4]),
], ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["sample", "sample_rows"])
def test_ties_with_the_last_kept_token_are_kept(s, kept, per_row):
  probs = reference(TIES, s)
  np.testing.assert_array_equal(np.flatnonzero(probs), kept)
  got = draws_rows(TIES[None], [s]) if per_row else draws(TIES[None], s)
  assert_drawn_from(got[:, 0], probs)


def test_greedy_is_the_first_argmax_for_any_key():
  rows = jnp.asarray(np.concatenate([RANDOM, TIES[None]]))
  for seed in range(5):
    got = sample(rows, jax.random.key(seed), Sampling())
    np.testing.assert_array_equal(got, np.argmax(np.asarray(rows), -1))
    keys = jax.random.split(jax.random.key(seed), len(rows))
    got = sample_rows(rows, keys, SamplingRows.of([Sampling()] * len(rows)))
    np.testing.assert_array_equal(got, np.argmax(np.asarray(rows), -1))


def test_greedy_over_a_wide_vocabulary_is_the_first_argmax():
  """Greedy finds the maximum block by block: ties across blocks, a partial last block."""
  rows = np.round(np.random.default_rng(1).standard_normal((4, 1300)), 1).astype(np.float32)
  rows[0, [700, 511, 512, 1299]] = 9.0  # the first is in the second block
  rows[1, [1299, 1024]] = 9.0
  rows[2] = 0.0
  rows[3, -1] = 9.0  # in the padded last block
  want = np.argmax(rows, -1)
  np.testing.assert_array_equal(sample(jnp.asarray(rows), jax.random.key(0), Sampling()), want)
  keys = jax.random.split(jax.random.key(0), len(rows))
  got = sample_rows(jnp.asarray(rows), keys, SamplingRows.of([Sampling()] * len(rows)))
  np.testing.assert_array_equal(got, want)
