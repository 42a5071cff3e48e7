"""smallfour.platforms: libtpu quieted only on hosts without TPU chips, by jax's own scan."""

import importlib

from smallfour import platforms


def test_jaxs_private_tpu_scan_is_where_platforms_imports_it():
  """The one private jax symbol smallfour uses; if a jax release moves it, this fails
  (platforms.py would then silently leave libtpu's warnings on)."""
  module, name = platforms.TPU_SCAN.rsplit(".", 1)
  try:
    scan = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise AssertionError(f"{platforms.TPU_SCAN} moved in this jax ({e}): find where jax "
                         "scans PCI for TPU chips now and update smallfour/platforms.py") from e
  assert platforms._tpu_scan is scan
  chips, _ = scan()
  assert isinstance(chips, int) and chips >= 0


def test_without_chips_only_unset_variables_are_set(monkeypatch):
  monkeypatch.setattr(platforms, "_tpu_scan", lambda: (0, None))
  environ = {"TPU_ACCELERATOR_TYPE": "v5litepod-8"}
  platforms.quiet_libtpu_without_tpus(environ)
  assert environ == {"TPU_ACCELERATOR_TYPE": "v5litepod-8", "TPU_WORKER_HOSTNAMES": "localhost",
                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def test_a_tpu_host_or_a_moved_scan_touches_nothing(monkeypatch):
  for scan in (lambda: (4, None), None):
    monkeypatch.setattr(platforms, "_tpu_scan", scan)
    environ = {}
    platforms.quiet_libtpu_without_tpus(environ)
    assert environ == {}
