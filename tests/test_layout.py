"""The package's shape: imports point down, so no module imports one that imports it back."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ifam_jax'
ENTRY_POINTS = {'ifam_jax.main', 'ifam_jax.bench', 'ifam_jax.compare'}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """{module: the ifam_jax modules it imports}, at any depth of its code."""
  modules = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:  # a submodule, or the module
        edges |= {f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                  else node.module for a in node.names}
    graph[name] = {e for e in edges if e in modules and e != name}
  return graph


def test_the_import_graph_has_no_cycle():
  graph = import_graph()
  assert len(graph) > 30 and 'ifam_jax.train' in graph['ifam_jax.main']  # the parse sees imports
  state: dict[str, str] = {}

  def visit(module, path):
    state[module] = 'open'
    for dep in sorted(graph[module]):
      if state.get(dep) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(path[path.index(dep):] + [dep]))
      if dep not in state:
        visit(dep, path + [dep])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_only_entry_points_import_the_train_loop():
  importers = {m for m, deps in import_graph().items() if 'ifam_jax.train' in deps}
  assert importers <= ENTRY_POINTS, importers - ENTRY_POINTS
