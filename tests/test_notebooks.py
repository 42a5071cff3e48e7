"""Every notebook in notebooks/ runs top to bottom on a fresh kernel, and its plots render.

Each notebook executes in its own kernel process (nbclient) with the cwd set to
notebooks/, as a user opening it would have; a failing cell fails the test with the
cell's traceback. The committed notebooks carry no outputs (`test_committed_stripped`).
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re

import nbclient
import nbformat
import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
# The least number of matplotlib figures (image/png outputs) each notebook must show.
MIN_PLOTS = {
    "01_architecture.ipynb": 6,
    "02_routing.ipynb": 5,
    "03_chat.ipynb": 2,
    "04_finetune.ipynb": 2,
}
CELL_TIMEOUT_S = 600


def _notebooks() -> list[pathlib.Path]:
  return sorted(NOTEBOOKS.glob("*.ipynb"))


def _kernel_env() -> dict[str, str]:
  """The test process's environment without conftest's 8 simulated devices: the
  notebooks run on one CPU device, as on a laptop."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = flags.strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
  return env


def test_every_notebook_is_listed():
  assert sorted(p.name for p in _notebooks()) == sorted(MIN_PLOTS)


@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_committed_stripped(path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: cell {cell.get('id')} has outputs; commit notebooks stripped")


def _execute(path: pathlib.Path) -> nbformat.NotebookNode:
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOKS)}})
  client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell
  return nb


@pytest.fixture(scope="module")
def executed() -> dict[str, concurrent.futures.Future]:
  """The notebooks started together, each on its own fresh kernel (a process of its own):
  their imports and compilations overlap on the machine's cores instead of taking turns.
  Two at a time on a small machine (a kernel holds a GB or two), all on a larger one."""
  workers = min(len(MIN_PLOTS), max(2, (os.cpu_count() or 1) // 2))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
  futures = {path.name: pool.submit(_execute, path) for path in _notebooks()}
  yield futures
  pool.shutdown(wait=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", _notebooks(), ids=lambda p: p.stem)
def test_notebook_runs(executed, path):
  nb = executed[path.name].result()  # re-raises the notebook's CellExecutionError
  plots = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
           if o.get("output_type") in ("display_data", "execute_result")
           and "image/png" in o.get("data", {})]
  assert len(plots) >= MIN_PLOTS[path.name], (
      f"{path.name}: {len(plots)} image/png outputs, expected at least {MIN_PLOTS[path.name]}")
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.get("output_type") == "error"]
  assert not errors
