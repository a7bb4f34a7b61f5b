"""The import structure (docs/architecture.md, "Layers"), read from the source with `ast` (nothing imported).

- No cycle among the project's modules at module level (TYPE_CHECKING blocks aside).
- Packages depend one way: core <- backbones, encoders <- methods <- benchmarks.
- benchmarks/: sub-packages in stage order data <- build <- config <- evaluation <- execution <- reporting, under the
  command modules (benchmarks/*.py); a module imports (at any depth) only its own layer and those below it, and no
  sub-package imports a command module.
- benchmarks/: a function-local import is of a third-party module only, with a comment saying why (optional or
  heavy); project modules are imported at the top, so a cycle cannot hide in a function.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "backbones", "encoders", "methods", "benchmarks")
PACKAGE_RANK = {"core": 0, "backbones": 1, "encoders": 1, "methods": 2, "benchmarks": 3}
LAYERS = ("data", "build", "config", "evaluation", "execution", "reporting")   # bottom to top; commands above
# Package-level exceptions, each a function-local import with its reason at the import.
UPWARD_ALLOWED = {("core.cache", "benchmarks.config.cli")}   # `python -m core.cache`'s --help uses the CLI layer


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


MODULES = modules()


def resolve(name: str) -> str | None:
    """The project module an imported dotted name lives in (a package's __init__ counts), or None (third party)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str) -> list[tuple[str, bool, ast.stmt]]:
    """(imported project module, at module level?, the statement) for every import in a module."""
    tree = ast.parse(MODULES[name].read_text())
    found: list[tuple[str, bool, ast.stmt]] = []

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((m, not local, child) for a in child.names if (m := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    m = resolve(f"{child.module}.{a.name}") or resolve(child.module)
                    if m:
                        found.append((m, not local, child))
            visit(child, inner)
    visit(tree, False)
    return [(m, top, st) for m, top, st in found if m != name]


def layer(name: str) -> int | None:
    """A benchmarks module's layer index; len(LAYERS) for a command module; None outside benchmarks/."""
    parts = name.split(".")
    if parts[0] != "benchmarks" or len(parts) == 1:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else len(LAYERS)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := dfs(m)):
                return c
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state and (c := dfs(n)):
            return c
    return None


def test_no_import_cycle_at_module_level():
    graph = {n: {m for m, top, _ in imports(n) if top} for n in MODULES}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]    # the check can fail


def test_packages_depend_one_way():
    bad = [(n, m) for n in MODULES for m, _, _ in imports(n)
           if PACKAGE_RANK[m.split(".")[0]] > PACKAGE_RANK[n.split(".")[0]] and (n, m) not in UPWARD_ALLOWED]
    assert not bad, f"imports against core <- backbones, encoders <- methods <- benchmarks: {bad}"


def test_benchmarks_layers_follow_the_stages():
    assert sorted(p.name for p in (ROOT / "benchmarks").iterdir()
                  if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)
    bad = [(n, m) for n in MODULES if layer(n) is not None and layer(n) < len(LAYERS)
           for m, _, _ in imports(n) if layer(m) is not None and layer(m) > layer(n)]
    assert not bad, f"a layer imports one above it (order {' <- '.join(LAYERS)} <- commands): {bad}"
    assert layer("benchmarks.reporting.report") > layer("benchmarks.data.prepare")      # the order is the stages'


def test_function_local_imports_are_third_party_and_commented():
    bad = []
    for n, f in MODULES.items():
        if not n.startswith("benchmarks"):
            continue
        lines = f.read_text().splitlines()
        tree = ast.parse(f.read_text())
        for fn in [x for x in ast.walk(tree) if isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for st in [x for x in ast.walk(fn) if isinstance(x, (ast.Import, ast.ImportFrom))]:
                names = [a.name for a in st.names] if isinstance(st, ast.Import) else [st.module or ""]
                project = any(resolve(x) for x in names)
                commented = "#" in lines[st.end_lineno - 1] or lines[st.lineno - 2].strip().startswith("#")
                if project or not commented:
                    bad.append(f"{f.relative_to(ROOT)}:{st.lineno}: {ast.unparse(st)}")
    assert not bad, "function-local imports must be third-party and say why (optional or heavy):\n" + "\n".join(bad)


def test_the_architecture_page_names_every_module_where_it_lives():
    """docs/architecture.md's layer table lists each sub-package's modules: every one named exists in that
    folder, and every module in the folder is named (a reader finds where any stage lives in one step)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    for pkg in LAYERS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{pkg}/` |"))
        named = set(re.findall(r"`(\w+)`", row.split("|")[3]))
        on_disk = {f.stem for f in (ROOT / "benchmarks" / pkg).glob("*.py") if f.stem != "__init__"}
        assert named == on_disk, f"{pkg}/: the table names {sorted(named - on_disk)} that are not there and " \
                                 f"misses {sorted(on_disk - named)}"
