"""The README's commands are what CI runs, and every run-time import is declared."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(n: int) -> str:
  out = subprocess.run([sys.executable, os.path.join(REPO, ".ci", "readme_command.py"), str(n)],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_ci_runs_the_readme_commands():
  main_cmd, test_cmd = _block(1), _block(2)
  assert "python -m dcsft_jax.main --config=configs/dcsft.py" in main_cmd
  assert "-r requirements.txt" in main_cmd and "requirements-test" not in main_cmd
  assert "pytest" in test_cmd
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  # CI reads both commands from the README (no copies that could drift).
  assert "readme_command.py 1" in ci and "readme_command.py 2" in ci
  assert main_cmd not in ci and test_cmd not in ci


def _requirements(path: str) -> set[str]:
  names = set()
  for line in open(path):
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
      names.add(re.split(r"[<>=!~\[; ]", line)[0].lower().replace("_", "-"))
  return names


def _imports(root: str) -> set[str]:
  mods = set()
  for dirpath, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            mods.update(a.name.split(".")[0] for a in node.names)
          elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module.split(".")[0])
  return mods


# Imported through another package that does not declare it (transformers' chat templates need jinja2).
INDIRECT = {"jinja2"}


def test_every_runtime_import_is_declared_in_requirements():
  """Every third-party module the package imports, lazily or not, comes from a distribution named in
  requirements.txt (the README's first command installs nothing else)."""
  declared = _requirements(os.path.join(REPO, "requirements.txt"))
  dists = importlib.metadata.packages_distributions()
  missing = {}
  for mod in sorted(_imports(os.path.join(REPO, "dcsft_jax"))):
    if mod == "dcsft_jax" or mod in sys.stdlib_module_names or mod == "__future__":
      continue
    names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
    if not names & declared:
      missing[mod] = sorted(names)
  assert not missing, f"imported but not in requirements.txt: {missing}"
  assert INDIRECT <= declared
