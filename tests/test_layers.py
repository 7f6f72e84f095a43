"""The package's structure: the library (solving) never imports the application (models,
training, data, analysis), and the library's modules form no import cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "deepeq"
APPLICATION = ("models", "train", "data", "analysis", "experiments", "generation", "__main__")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """deepeq modules a file imports (at run time or for type checking: a cycle of either
    kind makes the modules one unit a reader must take in together)."""
    tree = ast.parse(path.read_text())
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("deepeq"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("deepeq")}
    return out


FILES = {_module(p): p for p in ROOT.rglob("*.py")}
LIBRARY = {m for m in FILES if m.split(".")[1:2] and m.split(".")[1] not in APPLICATION}


def test_the_library_does_not_import_the_application():
    for mod in sorted(LIBRARY):
        bad = {
            i for i in _imports(FILES[mod]) if i.split(".")[1:2] and i.split(".")[1] in APPLICATION
        }
        assert not bad, f"{mod} imports {sorted(bad)}"


def test_no_import_cycle_in_the_library():
    graph = {m: {i for i in _imports(FILES[m]) if i in FILES and i != m} for m in LIBRARY}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert "deepeq._fixed_point" not in graph["deepeq.backward._base"]
