"""Many runs of one launcher in one interpreter: one start (python, jax, the launcher's
imports: 5-10 s each on a small machine) instead of one per case.

    for out in launch_many.run("generate.py", [["--config=tiny", "--top_p=0"], ...]):
      assert out.returncode != 0 and "top_p must lie in (0, 1]" in out.stderr

Each case is what `python launch/<script> <argv>` would give: absl's `app.run` on the
launcher's `main`, its flags back at their defaults first, its exit status as the
interpreter would report it (SystemExit's code or message, 1 on an exception, with the
traceback), and everything written to file descriptors 1 and 2 (Python, absl logging,
XLA's C++ logs) while it ran. Run as a script, this file is that interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterable, Sequence

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"


def run(script: str, argvs: Iterable[Sequence[str]], *, env: dict[str, str] | None = None,
        environ: dict[str, str] | None = None, python: str | os.PathLike = sys.executable,
        cwd: str | os.PathLike | None = None,
        timeout: float = 600) -> list[subprocess.CompletedProcess]:
  """`launch/<script>` run with each argv in turn, in one fresh interpreter (`python`, in
  `cwd`): its environment this one's updated with `env`, or exactly `environ`."""
  argvs = [list(map(str, argv)) for argv in argvs]
  if environ is None:
    environ = {**os.environ, **(env or {})}
  with tempfile.TemporaryDirectory() as tmp:
    cases, results = pathlib.Path(tmp, "cases.json"), pathlib.Path(tmp, "results.json")
    cases.write_text(json.dumps(argvs))
    proc = subprocess.run([str(python), __file__, str(LAUNCH / script), str(cases),
                           str(results)], capture_output=True, text=True, timeout=timeout,
                          env=environ, cwd=cwd)
    assert proc.returncode == 0 and results.exists(), proc.stderr[-3000:]
    return [subprocess.CompletedProcess([script, *argv], r["returncode"], r["stdout"],
                                        r["stderr"])
            for argv, r in zip(argvs, json.loads(results.read_text()), strict=True)]


def _exit_status(fn) -> int:
  """What the interpreter would exit with after `fn` (writing what it would print)."""
  try:
    fn()
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:  # noqa: BLE001 - as an uncaught exception ends a process
    traceback.print_exc()
    return 1
  return 0


def _captured(fn) -> tuple[int, str, str]:
  """`fn`'s exit status and what reached file descriptors 1 and 2 meanwhile."""
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    try:
      status = _exit_status(fn)
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])
    texts = []
    for f in (out, err):
      f.seek(0)
      texts.append(f.read().decode("utf-8", "replace"))
  return status, *texts


def _drive(script: str, cases: str, results: str) -> None:
  from absl import app, flags

  sys.argv = [script]
  sys.path[0] = os.path.dirname(script)  # as `python launch/<script>` has it
  spec = importlib.util.spec_from_file_location("_launcher", script)
  launcher = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = launcher
  spec.loader.exec_module(launcher)  # its flags, its main; not its `app.run`
  sys.modules["__main__"].__doc__ = launcher.__doc__  # absl's usage text on UsageError
  out = []
  for argv in json.loads(pathlib.Path(cases).read_text()):
    flags.FLAGS.unparse_flags()  # each case starts from the defaults
    status, stdout, stderr = _captured(lambda: app.run(launcher.main, argv=[script, *argv]))
    out.append({"returncode": status, "stdout": stdout, "stderr": stderr})
  pathlib.Path(results).write_text(json.dumps(out))


if __name__ == "__main__":
  _drive(*sys.argv[1:])
