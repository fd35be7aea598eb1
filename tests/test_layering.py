"""The package layout is the pipeline: every module imports only its own stage and the stages
before it (autotp/__init__.py lists them), so that no import cycle can form and a reader can
follow the stages in order. The public façade (autotp/__init__.py, __main__.py) may import
anything; the library never imports tools/."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "autotp"
STAGES = ["errors", "_compat", "core", "rules", "capture", "candidates", "cost", "solve", "plans",
          "rewrite", "runtime", "tools"]
FACADE = {"autotp", "autotp.__main__"}


def _stage(module: str) -> int:
    part = module.split(".")[1]
    assert part in STAGES, f"{module} is in no stage: add it to STAGES in the pipeline's order"
    return STAGES.index(part)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            todo.extend(node.orelse)
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, int]]:
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level
                                            + (path.name == "__init__.py")]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
    return [(n, line) for n, line in out if n == "autotp" or n.startswith("autotp.")]


def _modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_every_import_goes_to_an_earlier_stage() -> None:
    bad = []
    for module, path in _modules():
        if module in FACADE:
            continue
        own = _stage(module)
        for name, line in _imports(path, module):
            if name == "autotp":
                bad.append(f"{path.relative_to(PKG.parent)}:{line} imports the façade autotp")
            elif _stage(name) > own:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({STAGES[own]}) imports {name} "
                           f"({STAGES[_stage(name)]}, a later stage)")
    assert not bad, "\n".join(bad)


def test_the_file_list_is_the_stages() -> None:
    top = {p.stem for p in PKG.iterdir() if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists())}
    assert top - {"__init__", "__main__"} == set(STAGES)


def test_no_import_cycle() -> None:
    import networkx as nx
    g = nx.DiGraph()
    names = {m for m, _ in _modules()}
    for module, path in _modules():
        if module in FACADE:
            continue
        for name, _ in _imports(path, module):
            target = name if name in names else name.rsplit(".", 1)[0]
            if target in names and target != module and target not in FACADE:
                g.add_edge(module, target)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles
