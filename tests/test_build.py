"""BUILD cannot rot: every module belongs to a target, every test module has a py_test.

The BUILD file is Starlark, a Python subset: it is evaluated here with stand-ins for the
rules, so the check needs no Bazel.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sdim_tf", "pipeline", "bench")


def _glob(include, exclude=()):
    found = {p for pattern in include for p in ROOT.glob(pattern) if p.is_file()}
    found -= {p for pattern in exclude for p in ROOT.glob(pattern)}
    return sorted(str(p.relative_to(ROOT)) for p in found)


def evaluate_build(text: str) -> dict[str, dict]:
    """name -> {"kind": rule, **attributes} for every target `text` declares."""
    targets = {}

    def rule(kind):
        def declare(name, **attributes):
            if name in targets:
                raise ValueError(f"target {name} declared twice")
            targets[name] = {"kind": kind, **attributes}
        return declare

    scope = {kind: rule(kind) for kind in ("py_library", "py_binary", "py_test", "filegroup")}
    scope.update(glob=_glob, package=lambda **kwargs: None, load=lambda *args: None)
    exec(compile(text, "BUILD", "exec"), scope)  # noqa: S102 - our own BUILD file
    return targets


@pytest.fixture(scope="module")
def targets():
    return evaluate_build((ROOT / "BUILD").read_text())


def _modules(folder):
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_library_or_binary(targets):
    covered = {src for t in targets.values() if t["kind"] in ("py_library", "py_binary")
               for src in t.get("srcs", [])}
    missing = [m for package in PACKAGES for m in _modules(package) if m not in covered]
    assert not missing, f"modules in no BUILD target: {missing}"
    support = [m for m in _modules("tests") if not pathlib.Path(m).name.startswith("test_")]
    assert set(support) <= {s for s in targets["test_support"]["srcs"]}


def test_every_test_module_has_a_py_test(targets):
    tests = {t["srcs"][0] for t in targets.values() if t["kind"] == "py_test"}
    expected = {m for m in _modules("tests") if pathlib.Path(m).name.startswith("test_")}
    assert expected == tests, (f"without a py_test: {sorted(expected - tests)}; "
                               f"py_test of no module: {sorted(tests - expected)}")
    for name, t in targets.items():
        if t["kind"] == "py_test":
            assert t["args"] == [t["srcs"][0]] and t["main"] == "tests/bazel_pytest.py", name
    # CI's Bazel run tests the smoke targets: fast ones, which exist
    smoke = {name for name, t in targets.items() if "smoke" in t.get("tags", [])}
    assert smoke and all("slow" not in targets[name]["tags"] for name in smoke)


def test_dependencies_exist_and_point_one_way(targets):
    for name, t in targets.items():
        for dep in t.get("deps", []):
            assert dep.startswith(":") and dep[1:] in targets, f"{name}: unknown dep {dep}"
        for path in [*t.get("srcs", []), *t.get("data", []), t.get("main", "BUILD")]:
            assert (ROOT / path).exists(), f"{name}: {path} does not exist"
    assert targets["pipeline"]["deps"] == [":sdim_tf"]
    assert "deps" not in targets["sdim_tf"]
    # sdim_tf never imports pipeline (the library stands alone)
    for module in _modules("sdim_tf"):
        tree = ast.parse((ROOT / module).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(i == "pipeline" or i.startswith("pipeline.") for i in imported), module


def test_the_check_catches_a_missing_target():
    text = (ROOT / "BUILD").read_text().replace('"test_losses",\n', "")
    tests = {t["srcs"][0] for t in evaluate_build(text).values() if t["kind"] == "py_test"}
    assert "tests/test_losses.py" not in tests
    with pytest.raises(ValueError, match="declared twice"):
        evaluate_build('py_library(name = "a")\npy_library(name = "a")\n')
