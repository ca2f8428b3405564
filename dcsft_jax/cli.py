"""The console scripts of pyproject.toml. Each runs its module exactly as `python -m MODULE` does
(runpy, as `__main__`), so a script and the module form behave the same: `dcsft_jax.aot`, for one,
must set up the compile-only environment before JAX starts, which its `__main__` block does."""
import runpy


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def main() -> None:
  """dcsft --config=configs/dcsft.py: the pipeline."""
  _run("dcsft_jax.main")


def generate() -> None:
  _run("dcsft_jax.generate")


def convert() -> None:
  _run("dcsft_jax.convert")


def aot() -> None:
  _run("dcsft_jax.aot")
