"""The package's import graph: every import goes to the same or a lower layer (the order in
README.md, "Architecture"), and no module imports itself back through others."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "facemoe_jax")
# Lowest first. A module may import its own layer and the ones below it.
LAYERS = (
    ("core",),
    ("parallel", "kernels"),
    ("losses",),
    ("models",),
    ("data",),
    ("train",),
    ("interop",),
    ("encoder",),
    ("evaluate",),
    ("export",),
    ("pipelines", "recipes", "study", "aot", "main"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> dict[str, str]:
    """{dotted module name: file} of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imports_of(path: str) -> list[tuple[int, str]]:
    """(line, module) of every facemoe_jax import in the file, at any depth (lazy ones too)."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("facemoe_jax")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("facemoe_jax"):
            if node.module == "facemoe_jax":  # `from facemoe_jax import x`: x is a module or
                out += [(node.lineno, f"facemoe_jax.{a.name}") for a in node.names]  # __version__
            else:
                out.append((node.lineno, node.module))
    return out


def layer(module: str) -> str | None:
    """The top-level unit of a dotted name (facemoe_jax.train.step -> train); None for the
    package root, whose __init__ imports nothing at import time."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_unit_of_the_package_has_a_layer():
    units = {layer(m) for m in modules()} - {None}
    assert units <= set(RANK), f"modules outside the layer order: {sorted(units - set(RANK))}"


def test_imports_go_only_downward():
    upward = []
    for module, path in modules().items():
        mine = layer(module)
        if mine is None:
            continue
        for line, target in imports_of(path):
            theirs = layer(target)
            if theirs in (None, "__version__"):
                continue
            if RANK.get(theirs, len(LAYERS)) > RANK[mine]:
                upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_circles():
    graph = {}
    names = modules()
    for module, path in names.items():
        targets = set()
        for _, target in imports_of(path):
            # `from facemoe_jax.models import build_model` imports facemoe_jax.models.
            while target not in names and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in names and target != module:
                targets.add(target)
        graph[module] = targets
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)
