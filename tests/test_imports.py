"""The package's import structure: no import circles; the core reward registry without the shapes
world, which registers its own rewards.

- The import graph of tdpo_jax-internal imports (module-level and inside functions: a lazy import
  counts, as does `importlib.import_module("tdpo_jax....")` with a literal name) is acyclic. An
  import of a.b.c also imports the packages a.b and a (their __init__), except the packages the
  importing module is itself inside of (Python initialises those first); naming such a package
  explicitly (`from tdpo_jax import rewards` inside tdpo_jax/rewards/) is an edge to it.
- The graph builder finds a lazy circle and a package-__init__ circle in a made-up package.
- Importing `tdpo_jax.rewards` loads no `tdpo_jax.shapes` module; the shapes rewards are known
  once `tdpo_jax.shapes.rewards` is imported (what `config.reward_modules` names).
"""
import ast
import os
import subprocess
import sys

import pytest

import tdpo_jax

PACKAGE_DIR = os.path.dirname(os.path.abspath(tdpo_jax.__file__))


def module_files(package_dir):
  """{dotted module name: file} of every .py file under a package directory."""
  root = os.path.dirname(package_dir)
  modules = {}
  for folder, _, files in os.walk(package_dir):
    for file in files:
      if file.endswith(".py"):
        path = os.path.join(folder, file)
        name = os.path.relpath(path, root)[:-len(".py")].replace(os.sep, ".")
        modules[name.removesuffix(".__init__")] = path
  return modules


def _import_targets(module, is_package, node, modules):
  """The dotted names one import statement (or import_module call) loads."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom):
    if node.level:
      parts = module.split(".") if is_package else module.split(".")[:-1]
      parts = parts[:len(parts) - node.level + 1]
      base = ".".join(parts + ([node.module] if node.module else []))
    else:
      base = node.module
    # `from a.b import c`: the module a.b.c if there is one, else the name c of a.b.
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
            for alias in node.names]
  # importlib.import_module("a.b") / __import__("a.b") with a literal name.
  return [node.args[0].value]


def _is_literal_import_call(node):
  if not isinstance(node, ast.Call) or not node.args:
    return False
  if not (isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
    return False
  func = node.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
  return name in ("import_module", "__import__")


def import_graph(package_dir):
  """{module: set of the package's modules it imports (directly, lazily or not)}."""
  modules = module_files(package_dir)
  top = os.path.basename(package_dir)
  graph = {}
  for module, path in modules.items():
    is_package = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as file:
      tree = ast.parse(file.read(), filename=path)
    edges = set()
    for node in ast.walk(tree):
      if not (isinstance(node, (ast.Import, ast.ImportFrom)) or _is_literal_import_call(node)):
        continue
      for target in _import_targets(module, is_package, node, modules):
        if target.split(".")[0] != top:
          continue
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
          loaded = ".".join(parts[:i])  # the target and every package above it
          if loaded not in modules or loaded == module:
            continue
          if module.startswith(loaded + ".") and loaded != target:
            continue  # a package around `module`: already being initialised
          edges.add(loaded)
    graph[module] = edges
  return graph


def find_cycles(graph):
  """One cycle (a list [a, b, ..., a]) per strongly connected component that has one."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def cycle_in(component):
    """A shortest cycle through the component's first member (breadth-first within it)."""
    members, start = set(component), min(component)
    parent, frontier = {start: None}, [start]
    while frontier:
      node = frontier.pop(0)
      for nxt in sorted(graph[node]):
        if nxt == start:
          path = [node]  # node, its parent, ..., start
          while parent[path[-1]] is not None:
            path.append(parent[path[-1]])
          return path[::-1] + [start]
        if nxt in members and nxt not in parent:
          parent[nxt] = node
          frontier.append(nxt)
    raise AssertionError(f"no cycle through {start} in {sorted(members)}")

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph[node]:
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1 or node in graph[node]:
        cycles.append(cycle_in(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return cycles


def test_tdpo_jax_has_no_import_cycles():
  graph = import_graph(PACKAGE_DIR)
  assert "tdpo_jax.rewards" in graph and "tdpo_jax.train" in graph
  # The walker sees imports inside functions and `from package import module`.
  assert "tdpo_jax.rewards" in graph["tdpo_jax.shapes.rewards"]
  assert "tdpo_jax.models.tiny" in graph["tdpo_jax.models.pipeline"]
  cycles = find_cycles(graph)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_graph_finds_lazy_and_package_cycles(tmp_path):
  package = tmp_path / "fake"
  _write(package / "__init__.py", "")
  _write(package / "a.py", "from fake import b\n")
  _write(package / "b.py", "def f():\n  from fake import a  # lazy\n  return a\n")
  _write(package / "c.py", "import fake.d.e\n")
  _write(package / "d" / "__init__.py", "from fake.d import e\n")
  _write(package / "d" / "e.py", "import numpy\nfrom . import f\n")  # sibling: no edge to d
  _write(package / "d" / "f.py", "")
  _write(package / "g" / "__init__.py", "from fake.g import h\n")
  _write(package / "g" / "h.py", "from fake import g\n")  # names its own package
  _write(package / "i.py", "import importlib\nimportlib.import_module('fake.j')\n")
  _write(package / "j.py", "import fake.i\n")
  graph = import_graph(str(package))
  assert graph["fake.c"] == {"fake.d", "fake.d.e"}
  assert graph["fake.d.e"] == {"fake.d.f"}
  cycles = sorted(find_cycles(graph))
  assert cycles == [["fake.a", "fake.b", "fake.a"], ["fake.g", "fake.g.h", "fake.g"],
                    ["fake.i", "fake.j", "fake.i"]], cycles


def _assert_prints_ok(code):
  """Runs `code` in a fresh interpreter (its own sys.modules) and expects it to print "ok"."""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_reward_registry_does_not_load_the_shapes_world():
  code = ("import sys\n"
          "from tdpo_jax import rewards\n"
          "shapes = sorted(m for m in sys.modules if m.startswith('tdpo_jax.shapes'))\n"
          "assert not shapes, shapes\n"
          "assert 'shapes_gold' not in rewards.available()\n"
          "rewards.import_reward_modules(('tdpo_jax.shapes.rewards',))\n"
          "names = {'shapes_gold', 'shapes_gold_fidelity', 'shapes_gold_quality',\n"
          "         'shapes_proxy', 'shapes_aesthetic'}\n"
          "assert names <= set(rewards.available()), rewards.available()\n"
          "print('ok')\n")
  _assert_prints_ok(code)


def test_the_trunk_does_not_load_the_shapes_world():
  code = ("import sys\n"
          "from tdpo_jax import train, evaluation, kernels, epoch, critic_tower\n"
          "shapes = sorted(m for m in sys.modules if m.startswith('tdpo_jax.shapes'))\n"
          "assert not shapes, shapes\n"
          "assert 'shapes_aesthetic' not in critic_tower._BUILDERS\n"
          "from tdpo_jax.shapes import rewards\n"
          "assert 'shapes_aesthetic' in critic_tower._BUILDERS\n"
          "print('ok')\n")
  _assert_prints_ok(code)


def test_import_reward_modules_errors_and_registration():
  from tdpo_jax import rewards  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="reward_modules: no module named 'tdpo_jax.no_such'"):
    rewards.import_reward_modules(("tdpo_jax.no_such",))
  with pytest.raises(ValueError, match="must be a tuple of module names"):
    rewards.import_reward_modules("tdpo_jax.shapes.rewards")
  with pytest.raises(ValueError, match="unknown reward 'nope'.*config.reward_modules"):
    rewards.check_name("nope")

  def builder(scale, cache_dir=""):
    del cache_dir
    return lambda images, prompts: [scale] * len(prompts)

  rewards.register_model_reward("test_scaled", builder, ("scale",))
  rewards.check_name("test_scaled")
  assert rewards.make_reward_fn("test_scaled", {"test_scaled": {"scale": 2.0}})(
      None, ["a", "b"]) == [2.0, 2.0]
  with pytest.raises(ValueError, match="config.rewards.test_scaled has no 'scale'"):
    rewards.make_reward_fn("test_scaled", {"test_scaled": {}})
  with pytest.raises(ValueError, match="directory key 'dir' is not one of its keys"):
    rewards.register_model_reward("test_bad", builder, ("scale",), directory_keys=("dir",))
