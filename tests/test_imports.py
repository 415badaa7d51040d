"""The module graph of usjax: read from the source (every import statement, those inside functions included), so a
circle that a lazy import hides at load time still shows."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "usjax"


def modules() -> dict[str, str]:
  """{dotted module name: file} for every module of the package; a package is named by its folder."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def imports(path: str, known) -> set[str]:
  """The package's modules that the file at `path` imports anywhere in it. `from a import b` names module a.b
  when there is one, else a (b is a name defined in a)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names)
  return {m for m in out if m in known}


def graph() -> dict[str, set[str]]:
  known = modules()
  return {name: imports(path, known) - {name} for name, path in known.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
  """One circle of `g` as [a, b, ..., a], or None (depth-first search, three colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(g.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = "done"
    return None

  for node in sorted(g):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_walk_sees_every_kind_of_import():
  g = graph()
  assert "usjax.train" in g and "usjax.data.pipeline" in g and "usjax.data" in g
  assert "usjax.data.pipeline" in g["usjax.feed"]  # from usjax.data import pipeline
  assert "usjax" in g["usjax.runtime"]  # from usjax import UsjaxError: the package itself
  assert "usjax.runtime" in g["usjax.data.staging"]  # an import inside a function


def test_find_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
  cycle = find_cycle(graph())
  assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize("stage", ["usjax.finetune", "usjax.pretrain"])
def test_the_shared_loop_knows_no_stage(stage):
  g = graph()
  assert stage in g  # the stage exists, so its absence below means something
  assert stage not in g["usjax.train"]
