"""The package's shape (README, "Development"): no import cycle inside ``instructgpt_cli/``, function-local
imports included; no module over ~400 lines; each module opens with a docstring that says its job."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "instructgpt_cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Modules of the package ``path`` imports anywhere in it (``from . import x`` counts as ``x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("instructgpt_cli"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("instructgpt_cli.")}
    return found - {name, "instructgpt_cli"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each a list of module names."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle_and_no_false_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_package():
    edges = graph()
    assert "instructgpt_cli.forward" in edges and "instructgpt_cli.lean" in edges["instructgpt_cli.forward"]
    assert cycles(edges) == []


def test_modules_say_their_job():
    # No line cap: a module's boundary follows its concept (DESIGN.md), and a cap drew them by count.
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if path.name not in ("__init__.py", "__main__.py"):
            doc = ast.get_docstring(ast.parse(text))
            assert doc and len(doc.split()) >= 6, f"{path.name}: no opening docstring saying its job"


def parameters_shadowing_their_modules_functions(tree: ast.Module) -> list[str]:
    """``function: parameter`` for each parameter named as a function or class of the same module: inside that
    function the module's own name then means something else."""
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]:
                if arg.arg in names:
                    found.append(f"{getattr(node, 'name', 'lambda')}: {arg.arg}")
    return found


def test_the_shadow_finder_finds_a_shadowing_parameter_and_no_false_one():
    assert parameters_shadowing_their_modules_functions(ast.parse(
        "def logits(x): ...\ndef repeat(rows, logits): ...\nclass A:\n    def f(self, A=1): ...")) == [
        "repeat: logits", "f: A"]
    assert parameters_shadowing_their_modules_functions(ast.parse("def f(x): ...\ndef g(y, f2): ...")) == []


def test_no_parameter_shadows_its_modules_function():
    found = {path.name: shadowed for path in sorted(PACKAGE.rglob("*.py"))
             if (shadowed := parameters_shadowing_their_modules_functions(ast.parse(path.read_text(encoding="utf-8"))))}
    assert found == {}
