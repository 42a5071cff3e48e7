"""A regular (non-editable) install is complete and runs from outside the repository.

The editable install of the README hides missing packages (a folder without
`__init__.py`, a package left out of setup.cfg). This builds the wheel, checks that it
holds every module of the source tree, installs it into a scratch venv and runs the
launchers from another directory against it.
"""

import configparser
import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv
import zipfile

import pytest

from tests import launch_many

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (configs/ is smallfour.configs, see setup.cfg).
SOURCES = {"smallfour": "smallfour", "configs": "smallfour/configs"}


def _lowest(requirement: str) -> str:
  """The `>=` bound of an install_requires entry of setup.cfg (read, so the test and the
  declared requirement cannot drift)."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  for line in cfg["options"]["install_requires"].splitlines():
    found = re.fullmatch(rf"{re.escape(requirement)}(\[[\w,]+\])?>=([\w.]+)", line.strip())
    if found:
      return found[2]
  raise AssertionError(f"setup.cfg's install_requires has no {requirement}>=...")


def _source_modules() -> set[str]:
  modules = set()
  for folder, installed in SOURCES.items():
    for file in (ROOT / folder).rglob("*.py"):
      modules.add(f"{installed}/{file.relative_to(ROOT / folder).as_posix()}")
  return modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  # From a clean copy: setuptools reuses a stale build/ folder of the checkout.
  src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src)
  for folder in SOURCES:
    shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
  # Build isolation: the build backend comes from pyproject.toml's build-system, not from
  # whatever setuptools this environment happens to hold.
  built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                          str(out), str(src)], capture_output=True, text=True)
  assert built.returncode == 0, built.stderr[-3000:]
  (path,) = out.glob("smallfour-*.whl")
  return path


def test_wheel_holds_every_module(wheel):
  names = set(zipfile.ZipFile(wheel).namelist())
  missing = sorted(_source_modules() - names)
  assert not missing, f"the wheel lacks {missing}: add their packages to setup.cfg"
  assert not any(n.startswith("configs/") for n in names), "configs must not install top-level"


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
  env_dir = tmp_path / "venv"
  venv.create(env_dir, with_pip=False)
  python = env_dir / "bin" / "python"
  purelib = subprocess.check_output(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True)
  # The dependencies come from this interpreter's site-packages as plain path entries:
  # that dir's .pth files (among them the editable install's import hook) are not run,
  # so `smallfour` can only come from the wheel.
  pathlib.Path(purelib.strip(), "deps.pth").write_text(
      "\n".join(p for p in sys.path if p.endswith("-packages")))
  # The lowest mistral-common setup.cfg allows, ahead of this environment's (newer) one:
  # the chat format must hold with it (its own dependencies are this environment's).
  mistral_common = _lowest("mistral-common")
  for package in (str(wheel), f"mistral-common=={mistral_common}"):
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q",
                                "--target", purelib.strip(), package],
                               capture_output=True, text=True)
    assert installed.returncode == 0, f"{package}: {installed.stderr[-3000:]}"
  work = tmp_path / "elsewhere"
  work.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # the built-in tokenizer is written anew
  modules = sorted(m[:-3].replace("/", ".").removesuffix(".__init__")
                   for m in _source_modules())
  check = ("import importlib, mistral_common, smallfour\n"
           f"assert smallfour.__file__.startswith({str(env_dir)!r}), smallfour.__file__\n"
           f"assert mistral_common.__version__ == {mistral_common!r}, mistral_common.__version__\n"
           f"for m in {modules!r}: importlib.import_module(m)\n")
  run = lambda *args: subprocess.run(  # noqa: E731
      [python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
  imported = run("-c", check)
  assert imported.returncode == 0, imported.stderr[-3000:]
  info = run(str(ROOT / "launch" / "info.py"), "--config=tiny")
  assert info.returncode == 0, info.stderr[-3000:]
  # Raw ids, then the built-in tokenizer: written from the installed mistral-common's
  # vocabulary, then its chat encoding. One interpreter for both (tests/launch_many.py).
  generate = [["--config=tiny", "--prompt_ids=1,2,3", "--max_new_tokens=2"],
              ["--config=tiny", "--prompt=Hello there", "--reasoning_effort=high",
               "--max_new_tokens=2"]]
  for flags, result in zip(generate, launch_many.run(
      "generate.py", generate, environ=env, python=python, cwd=work, timeout=600)):
    assert result.returncode == 0, f"generate.py {flags}: {result.stderr[-3000:]}"
  assert list((tmp_path / "cache" / "smallfour").glob(f"*_mc{mistral_common}_*.json"))
