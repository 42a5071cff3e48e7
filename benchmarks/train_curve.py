"""The README's fine-tuning loss curve: launch/train.py on the tiny preset, then a PNG.

  python benchmarks/train_curve.py                      # train (~2 min on 2 CPUs), plot
  python benchmarks/train_curve.py --metrics=run.jsonl  # plot a metrics file only

Trains the tiny preset (random seeded weights, full fine-tuning) on the chat examples
in launch/examples/train_tiny.jsonl with the command printed first, reads its
`--metrics` JSONL and draws two panels: the loss over assistant tokens per step, and
the per-expert token fractions of the last MoE layer (the curve to watch for expert
collapse: one expert taking every token). Writes benchmarks/figures/train_tiny.png.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402
from absl import app, flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent

_METRICS = flags.DEFINE_string("metrics", None,
                               "An existing metrics JSONL to plot (default: train one).")
_PNG = flags.DEFINE_string("png", str(REPO / "benchmarks" / "figures" / "train_tiny.png"),
                           "Where the figure goes.")
_STEPS = flags.DEFINE_integer("steps", 60, "Steps to train.")

TRAIN_FLAGS = ["--config=tiny", "--data=launch/examples/train_tiny.jsonl", "--batch_size=4",
               "--max_seq_len=128", "--learning_rate=3e-3", "--warmup_steps=5",
               "--decay_steps=60", "--seed=0"]


def _train(workdir: str) -> str:
  metrics = os.path.join(workdir, "metrics.jsonl")
  command = [sys.executable, "launch/train.py", *TRAIN_FLAGS, f"--steps={_STEPS.value}",
             f"--out={os.path.join(workdir, 'run')}", f"--metrics={metrics}"]
  print(" ".join(["python", *command[1:]]), file=sys.stderr)
  subprocess.run(command, cwd=REPO, check=True)
  return metrics


def _plot(rows: list[dict], png: str) -> None:
  steps = [r["step"] for r in rows]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                    height_ratios=(2, 1))
  top.plot(steps, [r["loss"] for r in rows], color="tab:blue")
  top.set_ylabel("cross-entropy (assistant tokens)")
  top.set_title("Full fine-tuning, tiny preset, launch/examples/train_tiny.jsonl")
  top.grid(alpha=0.3)
  fractions = [r["expert_fractions"][-1] for r in rows]  # last MoE layer, [E] per step
  for e in range(len(fractions[0])):
    bottom.plot(steps, [f[e] for f in fractions], linewidth=1)
  bottom.axhline(1 / len(fractions[0]), color="gray", linestyle="--", linewidth=1)
  bottom.set_ylabel("token share\nper expert")
  bottom.set_xlabel("step")
  bottom.grid(alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(png), exist_ok=True)
  fig.savefig(png, dpi=100)


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as workdir:
    metrics = _METRICS.value or _train(workdir)
    with open(metrics) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  _plot(rows, _PNG.value)
  first, last = rows[0]["loss"], rows[-1]["loss"]
  print(json.dumps({"steps": rows[-1]["step"], "first_loss": round(first, 3),
                    "last_loss": round(last, 3), "png": _PNG.value}))


if __name__ == "__main__":
  app.run(main)
