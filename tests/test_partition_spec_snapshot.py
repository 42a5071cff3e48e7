"""Snapshot of the PartitionSpecs the rule table gives every small4_119b parameter.

The snapshot is the code's own earlier output, not an independent truth: it catches
unintended changes to the rule table or the parameter tree. After an intended change, run
`SMALLFOUR_UPDATE_SNAPSHOTS=1 python -m pytest tests/test_partition_spec_snapshot.py` (which rewrites
the file and fails), review the diff, then rerun without the variable.
"""

import json
import os

import pytest
from flax import nnx

from smallfour import configs
from smallfour import sharding, summary

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots",
                        "small4_119b_partition_specs.json")


def resolved_specs() -> dict[str, str]:
  """{"layers.*.ffn.experts.gate_proj": "P('expert', None, 'tensor')", ...}; layer indices
  collapse to * (every layer resolves alike, which this also checks)."""
  specs = sharding.partition_specs(summary.abstract_params(configs.resolve("small4_119b")))
  out: dict[str, str] = {}
  for path, var in nnx.to_flat_state(specs):
    key = ".".join("*" if isinstance(p, int) else p for p in path)
    value = str(var.get_value())
    assert out.setdefault(key, value) == value, f"{key} resolves differently across layers"
  return dict(sorted(out.items()))


def test_partition_specs_match_snapshot():
  got = resolved_specs()
  if os.environ.get("SMALLFOUR_UPDATE_SNAPSHOTS"):
    with open(SNAPSHOT, "w") as f:
      json.dump(got, f, indent=1)
      f.write("\n")
    # An update run never passes, so a stray variable in CI cannot bless a change unseen.
    pytest.fail(f"rewrote {SNAPSHOT}: review the diff (git diff -- {SNAPSHOT}), then rerun "
                "without SMALLFOUR_UPDATE_SNAPSHOTS")
  with open(SNAPSHOT) as f:
    assert got == json.load(f)
