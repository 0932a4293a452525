"""The package's shape (docs/README.md, "The package, module by module"): imports point one
way (no circle of modules, however long), functions stay short enough to read at once."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "structvit_jax"
MAX_FUNCTION_LINES, MAX_CLASS_LINES = 80, 150


def _modules() -> dict[str, ast.Module]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    out[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
  return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
  """The package modules `name` imports, at the top or inside functions."""
  package = name if name in known and any(k.startswith(name + ".") for k in known) else (
      name.rpartition(".")[0])
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                for a in node.names}
  return {m for m in found if m in known and m != name}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph[v]:
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
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circle():
  modules = _modules()
  graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
  assert graph["structvit_jax.train"] >= {"structvit_jax.train_state"}  # the graph is read
  assert _circles(graph) == []
  assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_functions_and_classes_stay_short():
  long = []
  for name, tree in _modules().items():
    for node in ast.walk(tree):
      limit = (MAX_FUNCTION_LINES if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               else MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else None)
      if limit and node.end_lineno - node.lineno + 1 > limit:
        long.append(f"{name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
  assert not long, long
