"""The README's commands are what CI runs, and every run-time import is declared."""
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _block(n: int) -> str:
  out = subprocess.run([sys.executable, os.path.join(REPO, ".ci", "readme_command.py"), str(n)],
                       capture_output=True, text=True, check=True)
  return out.stdout.strip()


def test_ci_runs_the_readme_commands():
  main_cmd, test_cmd = _block(1), _block(2)
  assert "python -m dcsft_jax.main --config=configs/dcsft.py" in main_cmd
  # The main job installs the core package alone (no extras): what the default run needs.
  assert re.search(r"pip install \.( |$)", main_cmd) and "[" not in main_cmd.split("&&")[0]
  assert "pytest" in test_cmd and ".[test]" in test_cmd
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  # CI reads both commands from the README (no copies that could drift).
  assert "readme_command.py 1" in ci and "readme_command.py 2" in ci
  assert main_cmd not in ci and test_cmd not in ci


def _name(requirement: str) -> str:
  return re.split(r"[<>=!~\[; ]", requirement.strip())[0].lower().replace("_", "-")


def _project() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _pyproject_tool() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["tool"]


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


# Imported by another package that does not declare it (transformers' chat templates need jinja2).
INDIRECT = {"jinja2"}
# Test-only distributions that the tests use without importing them by that name.
TEST_PLUGINS = {"pytest-xdist"}


def _dists(mods: set[str]) -> dict[str, set[str]]:
  dists = importlib.metadata.packages_distributions()
  return {m: {d.lower().replace("_", "-") for d in dists.get(m, [m])} for m in mods
          if m not in sys.stdlib_module_names and m not in ("dcsft_jax", "__future__")}


def test_every_import_is_declared_and_every_declared_package_is_used():
  """pyproject.toml is the one list: the package's imports come from its core dependencies, or from
  an extra and then only through dcsft_jax.optional (which names the install command); each core
  dependency and each data/checker extra is imported; the test extra covers the tests' imports."""
  from dcsft_jax import optional
  project = _project()
  core = {_name(r) for r in project["dependencies"]}
  extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
  used = _dists(_imports(os.path.join(REPO, "dcsft_jax")))
  optional_dists = {dist: (mod, extra) for mod, (extra, dist) in optional.EXTRAS.items()}
  missing = {m: sorted(n) for m, n in used.items() if not n & core and not n & set(optional_dists)}
  assert not missing, f"imported but not a core dependency in pyproject.toml: {missing}"
  for dist, (mod, extra) in optional_dists.items():
    assert dist in extras[extra], (dist, extra)
    assert dist not in core, f"{dist} is optional (dcsft_jax/optional.py) but a core dependency"
  used_names = set().union(*used.values())
  assert not (core - used_names - INDIRECT), f"declared but never imported: {sorted(core - used_names - INDIRECT)}"
  assert INDIRECT <= core
  # The tests import these; the test extra (with the extras it names) must bring them.
  test_side = core | extras["test"] | set().union(*(extras[e] for e in ("tfds", "hf-datasets", "math", "aot")))
  local = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(REPO, "tests"))}
  undeclared = {m: sorted(n) for m, n in _dists(_imports(os.path.join(REPO, "tests"))).items()
                if m not in local and not n & test_side}
  assert not undeclared, f"the tests import these, which the test extra does not bring: {undeclared}"
  assert TEST_PLUGINS <= extras["test"]


def test_requirement_files_are_the_pyproject_lists():
  """requirements*.txt exist for `pip install -r` habits; each is the package with an extra, not a
  second list that could drift."""
  for fn, want in (("requirements.txt", "."), ("requirements-test.txt", ".[test]"),
                   ("requirements-aot.txt", ".[aot]")):
    lines = [ln.split("#")[0].strip() for ln in open(os.path.join(REPO, fn))]
    assert [ln for ln in lines if ln] == [want], fn


# Roots of development and CI machines (home directories, scratch checkouts, package mirrors).
# Code and docs cite the paper or the authors' repository, never a path of the machine they were
# written on; example paths of a user's cluster (/mnt/shared, /data) are fine.
MACHINE_PATH = re.compile(r"(?<![\w.~$-])/(?:work|home|Users|root|opt/pypi[\w-]*|private/var)/[\w.-]+")


def test_no_absolute_path_of_a_development_machine():
  files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
  bad = []
  for f in files.stdout.split("\0"):
    path = os.path.join(REPO, f)
    if not f or not os.path.isfile(path):
      continue
    try:
      text = open(path, encoding="utf-8").read()
    except UnicodeDecodeError:
      continue
    bad += [f"{f}:{i}: {m.group(0)}" for i, line in enumerate(text.splitlines(), 1)
            for m in MACHINE_PATH.finditer(line)]
  assert not bad, "absolute paths of a development machine:\n" + "\n".join(bad)
  # The pattern does catch them (a test that cannot fail proves nothing).
  # (Spelled in pieces, or this file would hold what it forbids.)
  assert MACHINE_PATH.search("see /%s/main/tests" % "work") and MACHINE_PATH.search('open("/%s/me/x")' % "home")
  assert not MACHINE_PATH.search("data_dir=/%s/cluster/paper_data" % "mnt") and not MACHINE_PATH.search("a/%s/b" % "work")


def test_no_import_cycle_in_the_package():
  """No module of dcsft_jax imports, directly or through others, a module that imports it back:
  counting imports inside functions too (a deferred import hides a cycle from Python, not from the
  design). Fails naming the cycle's modules."""
  pkg = os.path.join(REPO, "dcsft_jax")
  modules = {}
  for root, _, files in os.walk(pkg):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
        modules[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)

  def imports(path: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from pkg import sub` is an edge to the submodule; to the package only for a name its
        # __init__ defines (a package's __init__ importing its own submodules is no cycle)
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                 for a in node.names]
      for n in names:
        # the most specific module the name is (from pkg import module) or is in
        while n and n not in modules:
          n = n.rpartition(".")[0]
        if n and n != "dcsft_jax":
          out.add(n)
    return out

  graph = {m: imports(p) - {m} for m, p in modules.items()}
  # Tarjan's strongly connected components: any of more than one module is a cycle.
  index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert len(graph) > 40 and graph["dcsft_jax.main"], graph.get("dcsft_jax.main")
  assert not cycles, cycles


# The family seam (issue 26): a module outside dcsft_jax/models/ that named a family would make a
# second family cost an edit there. Family packages are listed by the registry alone.
FAMILY_NAMES = re.compile(r"qwen2_5_vl|qwen3_vl|Qwen25VL|Qwen3VL|Qwen2_5_VL")


def _family_packages() -> list[str]:
  models = os.path.join(REPO, "dcsft_jax", "models")
  return sorted(d for d in os.listdir(models) if os.path.isfile(os.path.join(models, d, "__init__.py")))


def test_nothing_outside_models_names_a_family():
  offenders = []
  for dirpath, _, files in os.walk(os.path.join(REPO, "dcsft_jax")):
    if os.path.relpath(dirpath, REPO).split(os.sep)[:2] == ["dcsft_jax", "models"]:
      continue
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
          if FAMILY_NAMES.search(line):
            offenders.append(f"{os.path.relpath(path, REPO)}:{n}: {line.strip()}")
  assert not offenders, "modules outside dcsft_jax/models/ name a model family:\n" + "\n".join(offenders)
  # ...and the pattern covers every family package there is (a new family must be added to it).
  assert all(FAMILY_NAMES.search(p) for p in _family_packages()), _family_packages()


def test_only_the_registry_imports_family_packages():
  """Within models/, the generic modules (layers, params, rope, attention, family) import no family:
  only registry.py and the family packages themselves do."""
  models = os.path.join(REPO, "dcsft_jax", "models")
  families = _family_packages()
  for f in os.listdir(models):
    if not f.endswith(".py") or f == "registry.py":
      continue
    tree = ast.parse(open(os.path.join(models, f), encoding="utf-8").read())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      for name in names:
        assert not any(f"dcsft_jax.models.{fam}" == name or name.startswith(f"dcsft_jax.models.{fam}.")
                       for fam in families), f"dcsft_jax/models/{f} imports the family module {name}"


def test_the_package_list_ships_every_package_and_the_configs():
  """pyproject lists the packages (package-dir maps configs/ into the package, which find cannot do):
  a new package left out would be missing from every install, and the configs must go with it."""
  listed = set(_pyproject_tool()["setuptools"]["packages"])
  tree = {os.path.relpath(d, REPO).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(REPO, "dcsft_jax"))
          if "__init__.py" in files}
  configs = {"dcsft_jax.configs"} | {f"dcsft_jax.configs.{d}" for d in os.listdir(os.path.join(REPO, "configs"))
                                     if os.path.isdir(os.path.join(REPO, "configs", d)) and not d.startswith("_")}
  assert listed == tree | configs, sorted(listed ^ (tree | configs))


def test_a_config_name_resolves_to_the_shipped_config():
  from dcsft_jax import config_base
  here = os.path.join(REPO, "configs")
  assert config_base.resolve_config("dcsft") == os.path.join(here, "dcsft.py")
  assert config_base.resolve_config("dcsft:short=true") == os.path.join(here, "dcsft.py") + ":short=true"
  assert config_base.resolve_config("paper/imagenet_qwen25vl_3b") == os.path.join(here, "paper",
                                                                                  "imagenet_qwen25vl_3b.py")
  assert config_base.resolve_config("no_such_config") == "no_such_config"      # absl then names it
