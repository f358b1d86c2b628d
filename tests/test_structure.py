"""The package keeps its shape: no import cycle among hf_pmi's modules, counting imports inside functions."""

import ast
from pathlib import Path

import hf_pmi

ROOT = Path(hf_pmi.__file__).parent


def module_files(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of the package at `package_dir` (a package is its __init__)."""
    top = package_dir.name
    out = {}
    for path in package_dir.rglob("*.py"):
        parts = [top, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> dict[str, int]:
    """The package's modules that `name` imports (anywhere in the file) -> the first line doing it.

    ``from .x import y`` imports ``x.y`` when that is a module, else ``x``. Importing ``a.b.c`` also
    runs the ``__init__`` of the packages between the root and it (``a.b``): those count too; the
    root package itself does not (every module would import it).
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in known:  # a name inside a module imports the module
            target = target.rpartition(".")[0]
        parts = target.split(".")
        for depth in range(2, len(parts) + 1):  # the packages on the way, then the module itself
            module = ".".join(parts[:depth])
            if module in known and module != name and not name.startswith(module + "."):
                found.setdefault(module, line)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno)
    return found


def find_cycles(package_dir: Path) -> list[list[str]]:
    """Every import cycle (a strongly connected group of two or more modules), each named in order."""
    files = module_files(package_dir)
    graph = {m: imported_modules(m, p, set(files)) for m, p in files.items()}
    order, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return groups


def describe(package_dir: Path, group: list[str]) -> str:
    files = module_files(package_dir)
    edges = [f"{a} -> {b} ({files[a].name}:{line})" for a in group
             for b, line in imported_modules(a, files[a], set(files)).items() if b in group]
    return "import cycle of " + ", ".join(group) + ":\n  " + "\n  ".join(edges)


def test_hf_pmi_has_no_import_cycle():
    cycles = find_cycles(ROOT)
    assert not cycles, "\n".join(describe(ROOT, c) for c in cycles)


def test_a_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g  # inside a function: it counts\n")
    (pkg / "high.py").write_text("from . import low\n")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("")
    (pkg / "user.py").write_text("from .sub.leaf import x\n")  # runs sub/__init__ too, no cycle
    assert find_cycles(pkg) == [["toy.high", "toy.low"]]
    assert "toy.low -> toy.high (low.py:2)" in describe(pkg, ["toy.high", "toy.low"])
    (pkg / "sub" / "leaf.py").write_text("import toy.user\n")  # leaf -> user -> sub (its __init__) -> leaf
    assert ["toy.sub", "toy.sub.leaf", "toy.user"] in find_cycles(pkg)
