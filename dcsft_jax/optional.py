"""Optional dependencies: imported where a feature needs them, and named with their install command
when they are missing.

The core install (`pip install .`) runs the embedded default. TFDS sources, Hugging Face `datasets`
sources and math-verify's symbolic checking are extras (pyproject.toml), because each brings hundreds
of megabytes (TensorFlow's protobufs, pyarrow and pandas, sympy and antlr) that most runs never touch.
"""
from __future__ import annotations

import importlib
import logging
import types

log = logging.getLogger(__name__)

# module -> (the pyproject extra, the distribution)
EXTRAS = {
    "tensorflow_datasets": ("tfds", "tensorflow-datasets"),
    "datasets": ("hf-datasets", "datasets"),
    "math_verify": ("math", "math-verify"),
}


def install_hint(module: str) -> str:
  extra, dist = EXTRAS[module]
  return f"pip install 'dcsft-jax[{extra}]' (or: pip install {dist})"


def require(module: str, feature: str) -> types.ModuleType:
  """The module, or an ImportError that says which feature needs it and how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"{feature} needs the optional package {EXTRAS[module][1]}, which is not installed "
                      f"({e}). Install it: {install_hint(module)}") from e


def load(module: str, without: str) -> types.ModuleType | None:
  """The module, or None after one warning saying what runs without it (`without`) and how to add it."""
  try:
    return importlib.import_module(module)
  except Exception as e:  # noqa: BLE001 - a broken install (e.g. an antlr mismatch) is as good as none
    log.warning("%s is not usable (%s): %s. For it: %s", EXTRAS[module][1], e, without, install_hint(module))
    return None
