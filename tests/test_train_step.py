"""The train step against plain references: the MoE kernel's gradient equals the dense
oracle's, chunked attention's gradient equals the plain masked attention's, the loss and
its gradient equal a full-logits computation; the sharded step equals the single-device
one; LoRA on a frozen base trains only its adapters and merges exactly."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from smallfour import configs, sharding
from smallfour.nn import moe, moe_kernels
from smallfour.nn.decoder import Transformer
from smallfour.train import experts, forward, lora, loss, trainable
from smallfour.train.optimizer import OptimizerConfig
from smallfour.train.step import StepConfig, Trainer

CFG = configs.resolve("tiny").replace(vocab_size=512)  # random ids: no tokenizer needed
MESHES = [None, "data:1,expert:8,tensor:1", "data:2,expert:4,tensor:1",
          "data:1,expert:4,tensor:2"]


def _mesh(spec):
  return None if spec is None else sharding.make_mesh(sharding.parse_mesh(spec), CFG)


def _on(mesh):
  return jax.set_mesh(mesh) if mesh is not None else _Nothing()


class _Nothing:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def _batch(b=4, s=32, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([s, s - 12, s, 9][:b])
  valid = np.arange(s)[None] < lengths[:, None]
  return {"tokens": rng.integers(0, CFG.vocab_size, (b, s)).astype(np.int32),
          "targets": rng.integers(0, CFG.vocab_size, (b, s)).astype(np.int32),
          "valid": valid, "loss_mask": valid & (rng.random((b, s)) < 0.5)}


@pytest.mark.parametrize("spec, route", [(spec, "random") for spec in MESHES]
                         + [(spec, "one_expert") for spec in MESHES[:2]])
def test_expert_kernel_gradient_equals_dense_oracle(spec, route):
  """13 tokens: on a mesh they are padded with rows that own no expert."""
  e, d, f, n, k = 8, 16, 12, 13, 2
  rng = np.random.default_rng(3)
  gate, up = (rng.standard_normal((e, d, f), np.float32) / d**0.5 for _ in range(2))
  down = rng.standard_normal((e, f, d), np.float32) / f**0.5
  x = rng.standard_normal((n, d), np.float32)
  weights = rng.random((n, k), np.float32)
  ids = (rng.integers(0, e, (n, k)) if route == "random" else np.full((n, k), 5)).astype(
      np.int32)
  cotangent = rng.standard_normal((n, d), np.float32)

  def grads(kernel):
    f = lambda *a: jnp.sum(kernel(*a, ids) * cotangent)  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=range(5)))(gate, up, down, x, weights)

  want = grads(moe_kernels.dense)
  mesh = _mesh(spec)
  with _on(mesh):
    got = grads(experts.routed_experts)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_chunked_attention_gradients_equal_plain_attention():
  model = Transformer(CFG, rngs=nnx.Rngs(1))
  attn = model.layers[0].attn
  b, s = 2, 32
  x = jax.random.normal(jax.random.key(2), (b, s, CFG.hidden_size))
  valid = jnp.arange(s)[None] < jnp.array([[s], [19]])
  positions = jnp.broadcast_to(jnp.arange(s), (b, s))
  pos = model.positions(positions, x.dtype)
  mask = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]
  cotangent = jax.random.normal(jax.random.key(3), (b, s, CFG.hidden_size))
  graphdef, state = nnx.split(attn)

  def grads(run):
    f = lambda state, x: jnp.sum(run(nnx.merge(graphdef, state), x) * cotangent)  # noqa
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(state, x)

  want = grads(lambda a, x: a(x, pos, mask))
  got = grads(lambda a, x: forward.attend(a, x, pos, valid, 8))  # 4 chunks
  for u, v in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(v, u, atol=2e-5, rtol=1e-5)


def test_the_backward_keeps_only_block_boundaries():
  """Per-block remat and chunked attention and loss: besides the weights, the forward
  keeps one [B, S, D] array per block boundary (and [B, S]-sized tables) for the
  backward; no attention scores (a chunk's are 2x that) and no logits (2x as well)."""
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  b, s, chunk = 2, 128, 32
  batch = {k: jnp.asarray(v[:b, :s]) for k, v in _batch(b=4, s=s).items()}
  graphdef, state = nnx.split(model)

  def objective(state):
    m = nnx.merge(graphdef, state)
    h, _ = forward.hidden_states(m, batch["tokens"], batch["valid"], chunk)
    return loss.masked_mean(loss.token_losses(m, h, batch["targets"], chunk),
                            batch["loss_mask"])

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    print_saved_residuals(objective, state)
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for line in printed.getvalue().splitlines()
           if "from a constant" not in line and "from the argument" not in line
           for dims in re.findall(r"^\w+\[([0-9,]*)\]", line)]
  bsd = b * s * CFG.hidden_size
  assert sizes and max(sizes) <= bsd, sorted(sizes)[-5:]
  # The embeddings, the output of every block but the last, and the last one as the
  # loss's chunks.
  assert sizes.count(bsd) == CFG.num_layers + 1


def _nll_reference(logits, targets, mask):
  """Mean cross-entropy over the marked targets, in float64 numpy."""
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
  nll = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return (nll * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk", [8, pytest.param(32, marks=pytest.mark.slow)])
def test_loss_and_gradient_equal_the_full_logits_reference(chunk):
  """The train path (chunked attention and loss, remat, the MoE kernel with a gradient)
  against the model's own teacher-forced forward with its dense MoE oracle."""
  model = Transformer(CFG, rngs=nnx.Rngs(0))
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  graphdef, state = nnx.split(model)

  def train_loss(state):
    m = nnx.merge(graphdef, state)
    h, _ = forward.hidden_states(m, batch["tokens"], batch["valid"], chunk)
    return loss.masked_mean(loss.token_losses(m, h, batch["targets"], chunk),
                            batch["loss_mask"])

  def plain_loss(state):
    m = nnx.merge(graphdef, state)
    moe.set_impl(m, "dense_oracle")
    logits = m(batch["tokens"], valid=batch["valid"]).astype(jnp.float32)
    nll = (jax.nn.logsumexp(logits, -1)
           - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0])
    return loss.masked_mean(nll, batch["loss_mask"])

  value, grads = jax.jit(jax.value_and_grad(train_loss))(state)
  logits = model(batch["tokens"], valid=batch["valid"])
  np.testing.assert_allclose(float(value), _nll_reference(
      logits, np.asarray(batch["targets"]), np.asarray(batch["loss_mask"])), rtol=1e-5)
  want_value, want = jax.jit(jax.value_and_grad(plain_loss))(state)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(grads)):
    np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def _run(spec, steps=2, lora_config=None, select="all", aux=0.0):
  mesh = _mesh(spec)
  make = lambda: Transformer(CFG, rngs=nnx.Rngs(0))  # noqa: E731
  model = make() if mesh is None else sharding.init_sharded(make, mesh)
  if lora_config is not None:
    lora.apply_lora(model, lora_config, nnx.Rngs(1))
    if mesh is not None:
      sharding.place(model, mesh)
  trainer = Trainer(model, trainable.parse(select), OptimizerConfig(learning_rate=1e-3),
                    StepConfig(chunk=16, aux_loss_coef=aux), mesh)
  state, history = trainer.init(), []
  for i in range(steps):
    state, metrics = trainer.step(state, trainer.put_batch(_batch(seed=i)))
    history.append(jax.device_get(metrics))
  return trainer, state, history


@pytest.fixture(scope="module")
def single_device_run():
  return _run(None)


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES[1:3])
def test_sharded_step_equals_single_device(single_device_run, spec):
  _, want_state, want = single_device_run
  trainer, state, got = _run(spec)
  for w, g in zip(want, got):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # Adam divides by the gradient's own scale, so parameters with tiny gradients turn
  # rounding-level differences of the (equal) gradients into ~1e-6 ones.
  for a, b in zip(jax.tree.leaves(want_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
  # Experts stay split over `expert`, the moments like their parameters.
  expert_param = state.params["layers"][1]["ffn"]["experts"]["gate_proj"].get_value()
  assert expert_param.sharding.spec[0] == "expert"
  mu = state.opt_state[1][0].mu["layers"][1]["ffn"]["experts"]["gate_proj"].get_value()
  assert mu.sharding.spec[0] == "expert"


def test_metrics_of_a_step(single_device_run):
  _, _, history = single_device_run
  m = history[0]
  assert m["loss"] > 0 and m["grad_norm"] > 0 and m["tokens"] == _batch()["loss_mask"].sum()
  moe_layers = CFG.num_layers - CFG.first_k_dense_replace
  assert m["expert_fractions"].shape == (moe_layers, CFG.num_experts)
  np.testing.assert_allclose(m["expert_fractions"].sum(-1), 1.0, rtol=1e-6)
  assert m["aux_loss"] >= 1.0 - 1e-6  # E·Σ f·p is 1 when balanced, above otherwise
  assert m["learning_rate"] == pytest.approx(1e-3 / 10)  # step 0 of a 10-step warmup


def test_routing_stats_balance_loss():
  n, e = 6, 4
  uniform = forward.routing_stats(jnp.full((n, e), 1 / e), jnp.tile(jnp.arange(2), (n, 1)),
                                  jnp.ones(n, bool))
  assert float(uniform.aux) == pytest.approx(1.0)
  # Everything on expert 0, with the probability there: E·1·1.
  probs = jnp.zeros((n, e)).at[:, 0].set(1.0)
  skewed = forward.routing_stats(probs, jnp.zeros((n, 1), jnp.int32), jnp.ones(n, bool))
  assert float(skewed.aux) == pytest.approx(e)
  # Padding rows do not count.
  ids = jnp.array([[0], [1], [1], [1], [1], [1]])
  valid = jnp.array([True, True, False, False, False, False])
  assert forward.routing_stats(probs, ids, valid).fractions.tolist() == [0.5, 0.5, 0, 0]


@pytest.mark.slow
def test_lora_on_a_frozen_base_changes_only_adapters():
  config = lora.LoraConfig(4, ("attn", "experts"))
  base = Transformer(CFG, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(_batch()["tokens"])
  fresh = lora.apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)), config, nnx.Rngs(1))
  # B starts at zero: the adapters add nothing (to rounding: their program fuses otherwise)
  np.testing.assert_allclose(fresh(tokens), base(tokens), rtol=1e-6, atol=1e-6)
  trainer, state, history = _run(None, steps=2, lora_config=config, select="lora")
  assert history[1]["loss"] < history[0]["loss"] + 1.0
  trained = trainer.model(state)
  before = dict(nnx.to_flat_state(nnx.state(fresh, nnx.Param)))
  changed = set()
  for path, var in nnx.to_flat_state(nnx.state(trained, nnx.Param)):
    if not np.array_equal(var.get_value(), before[path].get_value()):
      changed.add(path)
  assert changed and all(path[-1] in ("a", "b") for path in changed)
  assert any(path[-1] == "b" for path in changed)
  adapted = trained(tokens)
  lora.merge_lora(trained)
  assert not any(isinstance(m, lora.LoraWeight) for _, m in nnx.iter_graph(trained))
  np.testing.assert_allclose(trained(tokens), adapted, atol=1e-5)


def test_trainable_specs():
  model = lora.apply_lora(Transformer(CFG, rngs=nnx.Rngs(0)), lora.LoraConfig(2),
                          nnx.Rngs(1))

  def names(spec):
    _, chosen, _ = nnx.split(model, trainable.parse(spec), ...)
    return {trainable.path_name(p) for p, _ in nnx.to_flat_state(chosen)}

  assert names("router") == {f"layers/{i}/ffn/router/kernel" for i in (1, 2)}
  assert all(n.endswith(("/a", "/b")) for n in names("lora")) and len(names("lora")) == 36
  assert names("lora,router") == names("lora") | names("router")
  assert len(names("all")) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  with pytest.raises(ValueError, match="not a regular expression"):
    trainable.parse("layers/(")
  with pytest.raises(ValueError, match="selects no parameter"):
    Trainer(model, trainable.parse("nothing_matches_this"), OptimizerConfig(), StepConfig())


@pytest.mark.slow
def test_119b_lora_step_compiles_from_abstract_inputs():
  """The release's shapes (one decoder layer of its 36: the layers are unrolled, so each
  adds the same compile work) on a simulated (1, 8, 1) mesh; nothing is allocated."""
  cfg = configs.resolve("small4_119b").replace(num_layers=1)
  mesh = sharding.make_mesh(sharding.parse_mesh("data:1,expert:8,tensor:1"), cfg)
  model = nnx.eval_shape(lambda: lora.apply_lora(
      Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16), lora.LoraConfig(16),
      nnx.Rngs(1)))
  trainer = Trainer(model, trainable.parse("lora"), OptimizerConfig(), StepConfig(), mesh)
  assert trainer.num_trainable == 472_064  # rank-16 adapters on the 6 MLA projections
  compiled = trainer.lower(batch_size=8, seq_len=1024).compile()
  # Arguments: this device's share of the text weights (16 of 128 experts), the adapters
  # and their moments, the batch (the vision tower is not an input: text-only data).
  flat = zip(jax.tree_util.tree_leaves_with_path(trainer.frozen),
             jax.tree.leaves(trainer.frozen_shardings))
  weights = sum(np.prod(s.shard_shape(v.shape)) * v.dtype.itemsize for (path, v), s in flat
                if path[0].key != "vision")
  assert weights < compiled.memory_analysis().argument_size_in_bytes < weights + 2e7
