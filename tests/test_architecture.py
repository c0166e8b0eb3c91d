"""The house's arrows, read from the source: sdim_tf <- pipeline <- bench, no cycles, no
stage importing another stage (function-local imports included), and no stage reading past
the inputs the runner hands it."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sdim_tf", "pipeline", "bench")
LAYER = {"sdim_tf": 0, "pipeline": 1, "bench": 2}
# A stage gets its inputs as views (`upstream`): it opens no run directory (`Run`), climbs out
# of its own folder (`.parent`, `.parents`, `.root`) or names the run directory (`run_dir`).
REACH_AROUNDS = {"Run", "run_dir"}
CLIMBS = {"parent", "parents", "root"}  # as attributes: `mkdir(parents=True)` climbs nowhere


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    modules = {_module_name(p, root): p for package in PACKAGES
               for p in (root / package).rglob("*.py") if "__pycache__" not in p.parts}
    graph = {}
    for name, path in modules.items():
        targets = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from package import module` imports the module; `from module import name`
                # the module
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by depth-first search (each reported once per entry point)."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def _is_stage(module: str) -> bool:
    return module.startswith("pipeline.stages.") and module != "pipeline.stages"


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_stages_import_no_other_stage():
    offending = {m: sorted(t for t in targets if _is_stage(t))
                 for m, targets in import_graph().items() if _is_stage(m)}
    assert {m: t for m, t in offending.items() if t} == {}


def test_arrows_point_one_way():
    for module, targets in import_graph().items():
        for target in targets:
            assert LAYER[target.split(".")[0]] <= LAYER[module.split(".")[0]], (module, target)


def test_the_checks_catch_violations(tmp_path):
    """A stage importing a stage inside a function, and a circle, are both found."""
    stages = tmp_path / "pipeline" / "stages"
    stages.mkdir(parents=True)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").write_text("")
    (stages / "__init__.py").write_text("")
    (stages / "a.py").write_text("def f():\n    from pipeline.stages import b\n")
    (stages / "b.py").write_text("from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["pipeline.stages.a"] == {"pipeline.stages.b"}
    assert "pipeline.stages.a" in graph["pipeline.stages.b"]
    assert ["pipeline.stages.a", "pipeline.stages.b", "pipeline.stages.a"] in cycles(graph)


def reach_arounds(source: str) -> list[str]:
    """"line N: name" for each name, argument or import of REACH_AROUNDS and attribute of
    either set."""
    found = []
    for node in ast.walk(ast.parse(source)):
        name = (node.id if isinstance(node, ast.Name) else
                node.attr if isinstance(node, ast.Attribute) else
                node.arg if isinstance(node, (ast.arg, ast.keyword)) else
                (node.asname or node.name) if isinstance(node, ast.alias) else None)
        if name in REACH_AROUNDS or (isinstance(node, ast.Attribute) and name in CLIMBS):
            found.append((node.lineno, name))
    return [f"line {line}: {name}" for line, name in sorted(found)]


def test_stages_read_only_their_declared_inputs():
    found = {p.name: reach_arounds(p.read_text())
             for p in sorted((ROOT / "pipeline" / "stages").glob("*.py"))}
    assert {name: lines for name, lines in found.items() if lines} == {}


def test_the_input_check_catches_a_reach_around():
    planted = ("from pipeline.run_dir import Run\n"
               "def run(config, stage_dir, upstream):\n"
               "    sibling = Run(stage_dir.parent.parent / 'other')\n"
               "    return helper(run_dir=upstream['ingest'].folder.parents[1])\n")
    assert reach_arounds(planted) == ["line 1: Run", "line 3: Run", "line 3: parent",
                                      "line 3: parent", "line 4: parents", "line 4: run_dir"]
