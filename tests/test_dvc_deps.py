"""dvc.yaml's deps name every project file a stage's code imports, so `dvc status` sees a change to any."""

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dfcvae", "pipeline")


def project_imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file (top level or inside functions), as file paths."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                parts = name.split(".")
                # the module's file, and the __init__.py of every package above it, which Python runs first
                candidates = [ROOT / (name.replace(".", "/") + ".py")]
                candidates += [ROOT.joinpath(*parts[:i], "__init__.py") for i in range(2, len(parts) + 1)]
                found |= {str(c.relative_to(ROOT)) for c in candidates if c.is_file()}
    return found


def closure(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += sorted(project_imports(ROOT / path) - seen)
    return seen


def test_every_stage_depends_on_all_the_project_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    missing = {}
    for name, stage in stages.items():
        entry = stage["cmd"].split("python -m ", 1)[1].split()[0]  # pipeline.<stage>
        needed = closure(entry.replace(".", "/") + ".py")
        deps = [d for d in stage["deps"] if isinstance(d, str)]
        uncovered = {f for f in needed if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)}
        if uncovered:
            missing[name] = sorted(uncovered)
    assert not missing, f"dvc.yaml stages miss deps on code they import: {missing}"


def test_register_depends_on_the_whole_package_it_bundles():
    """The registered model carries every file of dfcvae/ (code_paths), imported or not."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["register"]["deps"]
    assert "dfcvae" in deps


def test_the_import_walk_finds_function_level_imports():
    """The check can fail: pipeline/register.py reaches dfcvae/evaluate.py only through an import
    inside a function (the champion's re-evaluation)."""
    assert "dfcvae/evaluate.py" in project_imports(ROOT / "dfcvae" / "registry.py")
    assert "dfcvae/evaluate.py" in closure("pipeline/register.py")
