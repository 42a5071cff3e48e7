"""The README's accuracy table for integer weights: each weight format against bf16 weights.

  python benchmarks/quant_accuracy.py                    # fine-tune the tiny preset first
  python benchmarks/quant_accuracy.py --ckpt=/tmp/run    # a trained or converted checkpoint

Without --ckpt it fine-tunes the tiny preset (launch/train.py, ~3-6 min on 2 CPUs) on
launch/examples/train_tiny.jsonl without every 4th conversation, which it holds out.
Every format is made from the same float32 weights as the converter would make it
(int8/int4 by qwix, bit-identical to the converter's numpy, tests/test_quant_weights.py;
fp8 by `fp8.quantize`, one multiplier per tensor or per expert as released) and run in
float32 activations, so only the weights differ. The reference is the weights rounded to
bfloat16. Teacher-forced over the held-out conversations (the training data's chat
encoding), per format: top-1 agreement with the reference over every next-token position,
mean KL(reference || format) over the same positions, and the cross-entropy over the
held-out assistant tokens (the fine-tuning loss). The same rows follow for the seeded
random tiny preset on the same text (no structure: its logits are flat, which makes
top-1 fragile). Prints a markdown table.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from smallfour import configs
from smallfour.chat import ChatTokenizer
from smallfour.checkpoint import restore
from smallfour.nn import fp8, quant
from smallfour.nn.decoder import Transformer

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "launch" / "examples" / "train_tiny.jsonl"
HELD_OUT_EVERY = 4  # conversations 4, 8, 12, ... are held out of training

_CKPT = flags.DEFINE_string("ckpt", None, "A trained or converted checkpoint (default: train).")
_STEPS = flags.DEFINE_integer("steps", 60, "Fine-tuning steps when training here.")
_GROUPS = flags.DEFINE_list("int4_groups", ["32", "16", "8"],
                            "int4 group sizes (must divide hidden and expert widths).")

TRAIN_FLAGS = ["--config=tiny", "--batch_size=4", "--max_seq_len=128",
               "--learning_rate=3e-3", "--warmup_steps=5", "--decay_steps=60", "--seed=0"]


def _split(workdir: str) -> tuple[str, list[dict]]:
  lines = DATA.read_text().splitlines()
  train = [l for i, l in enumerate(lines, 1) if i % HELD_OUT_EVERY]
  held = [json.loads(l) for i, l in enumerate(lines, 1) if not i % HELD_OUT_EVERY]
  path = os.path.join(workdir, "train.jsonl")
  with open(path, "w") as f:
    f.write("\n".join(train) + "\n")
  return path, held


def _train(workdir: str, data: str) -> str:
  out = os.path.join(workdir, "run")
  command = [sys.executable, "launch/train.py", *TRAIN_FLAGS, f"--data={data}",
             f"--steps={_STEPS.value}", f"--out={out}"]
  print(" ".join(["python", *command[1:]]), file=sys.stderr)
  subprocess.run(command, cwd=REPO, check=True)
  return out


def _batch(tok: ChatTokenizer, held: list[dict]) -> tuple[jax.Array, np.ndarray, np.ndarray]:
  """Right-padded ids [B, S], valid [B, S] and next-token loss mask [B, S-1]."""
  encoded = [tok.encode_for_training(r) for r in held]
  s = max(len(ids) for ids, _ in encoded)
  ids = np.zeros((len(encoded), s), np.int32)
  valid = np.zeros((len(encoded), s), bool)
  loss = np.zeros((len(encoded), s), bool)
  for b, (t, m) in enumerate(encoded):
    ids[b, :len(t)], valid[b, :len(t)], loss[b, :len(t)] = t, True, m
  return jnp.asarray(ids), valid, loss[:, 1:]


def _log_probs(model: Transformer, ids: jax.Array, valid: np.ndarray) -> np.ndarray:
  logits = nnx.jit(lambda m, t, v: m(t, valid=v))(model, ids, jnp.asarray(valid))
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)[:, :-1], axis=-1))


def _to_bf16_values(model: Transformer) -> Transformer:
  """Every plain weight rounded to bfloat16 (kept float32): what a bf16 checkpoint holds,
  and what integer formats keep for the tensors they do not quantize."""
  nodes = list(nnx.iter_graph(model))
  held = {p for p, n in nodes if isinstance(n, (quant.QuantWeight, fp8.Fp8Weight))}
  for path, node in nodes:
    if isinstance(node, nnx.Param) and path[:-1] not in held:
      node.set_value(node.get_value().astype(jnp.bfloat16).astype(jnp.float32))
  return model


def _fp8(make, cfg) -> Transformer:
  """The release's FP8 format (e4m3, one multiplier per tensor or expert) from `make()`'s
  float32 weights."""
  plain = dict(nnx.to_flat_state(nnx.state(make(), nnx.Param)))
  model = Transformer(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, fp8=True)
  for path, node in list(nnx.iter_graph(model)):
    if isinstance(node, fp8.Fp8Weight):
      w = plain[path].get_value()
      q = fp8.quantize(w, 1 if w.ndim == 3 and path[-2] == "experts" else 0)
      node.codes.set_value(q.codes)
      node.scale.set_value(q.scale)
    elif isinstance(node, nnx.Param) and path in plain:
      node.set_value(plain[path].get_value())
  return _to_bf16_values(model)


def _formats(groups: list[int]) -> dict[str, quant.Quant | str | None]:
  """Each format; int8/int4 rows keep attention and shared experts bf16 (the default)
  unless marked "+ int8 attention" (`--dense_dtype=int8`)."""
  rows: dict[str, quant.Quant | str | None] = {
      "bf16 (reference)": None, "fp8 (release)": "fp8", "int8": quant.Quant("int8"),
      "int8 + int8 attention": quant.Quant("int8", dense="int8")}
  for g in groups:
    rows[f"int4 g{g}"] = quant.Quant("int4", g)
    rows[f"int4 g{g} + int8 attention"] = quant.Quant("int4", g, dense="int8")
  return rows


def _table(title: str, make, cfg, ids, valid, loss_mask, groups) -> list[str]:
  positions = valid[:, 1:]
  results = {}
  for name, form in _formats(groups).items():
    if form == "fp8":
      model = _fp8(make, cfg)
    else:
      model = make() if form is None else quant.apply(make(), form)
      model = _to_bf16_values(model)
    results[name] = _log_probs(model, ids, valid)
  ref = results["bf16 (reference)"]
  targets = np.asarray(ids)[:, 1:]
  lines = [f"\n{title}: {int(positions.sum())} positions, {int(loss_mask.sum())} "
           "assistant tokens\n",
           "| weights | top-1 agreement | mean KL (nats) | held-out loss |",
           "|---|---|---|---|"]
  for name, lp in results.items():
    agree = (lp.argmax(-1) == ref.argmax(-1))[positions].mean()
    kl = (np.exp(ref) * (ref - lp)).sum(-1)[positions].mean()
    nll = -np.take_along_axis(lp, targets[..., None], -1)[..., 0][loss_mask].mean()
    lines.append(f"| {name} | {100 * agree:.2f}% | {kl:.2e} | {nll:.4f} |")
  return lines


def main(argv):
  del argv
  groups = [int(g) for g in _GROUPS.value]
  with tempfile.TemporaryDirectory() as workdir:
    data, held = _split(workdir)
    ckpt = _CKPT.value or _train(workdir, data)
    tok = ChatTokenizer.from_file(os.path.join(ckpt, "tekken.json"))
    ids, valid, loss_mask = _batch(tok, held)
    cfg = restore.read_config(ckpt)
    lines = _table(f"Fine-tuned tiny model ({ckpt})",
                   lambda: restore.restore_model(ckpt, dtype="float32"), cfg, ids, valid,
                   loss_mask, groups)
    tiny = configs.resolve("tiny")
    lines += _table("Random tiny preset (seed 0)",
                    lambda: Transformer(tiny, rngs=nnx.Rngs(0), param_dtype=jnp.float32),
                    tiny, ids, valid, loss_mask, groups)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
