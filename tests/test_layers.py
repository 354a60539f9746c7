"""The package's layers: imports go one way, the command line alone parses arguments, and no
test hook lives in the product."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "densenet"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every densenet module that ``path`` imports, at the top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("densenet")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("densenet"):
                continue
            for a in node.names:  # `from . import x` names a module; `from .m import f` names m
                sub = f"{target}.{a.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else target)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_one_that_imports_it():
    graph = _graph()

    def reach(start):
        seen, stack = set(), list(graph.get(start, ()))
        while stack:
            m = stack.pop()
            if m not in seen:
                seen.add(m)
                stack.extend(graph.get(m, ()))
        return seen

    cycles = [m for m in graph if m in reach(m)]
    assert not cycles, cycles
    assert len(graph) > 20 and graph["densenet.train"]  # the graph was really read


def test_only_the_entry_point_imports_the_command_line():
    for m, deps in _graph().items():
        if not m.startswith("densenet.cli") and m != "densenet.__main__":
            assert not any(d.startswith("densenet.cli") for d in deps), (m, deps)


def test_the_api_does_not_import_the_package_root_or_the_command_line():
    graph = _graph()
    for m, deps in graph.items():
        if m not in ("densenet", "densenet.__main__"):
            assert "densenet" not in deps, m


def test_only_the_command_line_parses_arguments():
    users = [p.relative_to(PACKAGE.parent).as_posix() for p in PACKAGE.rglob("*.py")
             if "add_argument" in p.read_text()]
    assert users and all(u.startswith("densenet/cli/") for u in users), users


def test_no_fault_injection_hooks_in_the_product():
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        assert "DENSENET_KILL" not in text and "os.kill(os.getpid" not in text, p
