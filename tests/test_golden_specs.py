"""Golden dump of the PartitionSpecs the rule table gives every small4_119b parameter.

Regenerate after an intended change to the rule table or the parameter tree with
`SMALLFOUR_UPDATE_GOLDENS=1 python -m pytest tests/test_golden_specs.py`.
"""

import json
import os

from flax import nnx

from smallfour import configs
from smallfour import sharding, summary

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "small4_119b_specs.json")


def resolved_specs() -> dict[str, str]:
  """{"layers.*.ffn.experts.gate_proj": "P('expert', None, 'tensor')", ...}; layer indices
  collapse to * (every layer resolves alike, which the dump also checks)."""
  specs = sharding.partition_specs(summary.abstract_params(configs.resolve("small4_119b")))
  out: dict[str, str] = {}
  for path, var in nnx.to_flat_state(specs):
    key = ".".join("*" if isinstance(p, int) else p for p in path)
    value = str(var.get_value())
    assert out.setdefault(key, value) == value, f"{key} resolves differently across layers"
  return dict(sorted(out.items()))


def test_partition_specs_match_golden():
  got = resolved_specs()
  if os.environ.get("SMALLFOUR_UPDATE_GOLDENS"):
    with open(GOLDEN, "w") as f:
      json.dump(got, f, indent=1)
      f.write("\n")
  with open(GOLDEN) as f:
    assert got == json.load(f)
