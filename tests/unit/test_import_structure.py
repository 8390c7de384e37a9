"""The layering holds: data -> models -> privacy -> federated/serving -> program -> CLIs.

Walks every module of tff_dpmed with `ast` (imports inside functions too) and
checks that no module imports a higher layer, that the two layer-4 packages do
not import each other, and that there is no import cycle.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "tff_dpmed"
_LAYERS = (  # (module prefix, layer); the longest matching prefix wins.
    ("tff_dpmed", 0), ("tff_dpmed.errors", 0), ("tff_dpmed.files", 0),
    ("tff_dpmed.data", 1), ("tff_dpmed.models", 2), ("tff_dpmed.privacy", 3),
    ("tff_dpmed.federated", 4), ("tff_dpmed.serving", 4), ("tff_dpmed.program", 5),
    ("tff_dpmed.privacy.__main__", 6), ("tff_dpmed.cli", 0), ("tff_dpmed.train", 6),
    ("tff_dpmed.export", 6), ("tff_dpmed.serve", 6), ("tff_dpmed.predict", 6),
    ("tff_dpmed.worker", 6))


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> tuple[int, str]:
  best = max((p for p, _ in _LAYERS if module == p or module.startswith(p + ".")), key=len)
  return dict(_LAYERS)[best], best


def _imports(path: pathlib.Path, module: str) -> set[str]:
  found = set()
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("tff_dpmed")}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if base.startswith("tff_dpmed"):
        # `from tff_dpmed.x import y` may name a submodule y.
        found |= {f"{base}.{a.name}" if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")
                                         ).with_suffix(".py").exists()
                  or (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).is_dir()
                  else base for a in node.names}
  return found


def _graph() -> dict[str, set[str]]:
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  return {m: {i for i in _imports(p, m) if i in modules} for m, p in modules.items()}


def test_no_upward_or_sideways_import():
  bad = []
  for module, imports in _graph().items():
    layer, group = _layer(module)
    for target in imports:
      target_layer, target_group = _layer(target)
      if target_layer > layer or (target_layer == layer and layer > 0
                                  and target_group != group):
        bad.append(f"{module} (layer {layer}) imports {target} (layer {target_layer})")
  assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if nxt == node or nxt == node.rpartition(".")[0]:
        continue  # A module importing its own package's __init__ is not a cycle.
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_imports():
  # The checks above mean something only if the walk finds real edges.
  graph = _graph()
  assert "tff_dpmed.privacy.spec" in graph["tff_dpmed.privacy.mechanisms"]
  assert "tff_dpmed.program.loop" in graph["tff_dpmed.program.trainer"]
  assert _layer("tff_dpmed.privacy.__main__")[0] == 6
