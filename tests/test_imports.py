"""The import contract: dfcvae's modules form layers without cycles, and dfcvae never imports pipeline.

A package (dfcvae/shards/) is one node of the layers; its own modules form layers of their own.
Imports inside functions count too: one placed there to dodge a cycle is still a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers never import higher ones (docs: ../shared/STYLE.md's layering).
LAYERS = (
    {"config", "device", "weights", "metrics", "internals", "files", "sampler"},
    {"shards"},
    {
        "model",
        "features",
        "loss",
        "tracking",
        "synthetic",
        "images",
        "inventory",
        "cluster",
        "lpips_metric",
        "uncertainty",
    },
    {"pictures", "onnx_export", "sources"},
    {"checkpoint", "bundle", "fetch", "sharding"},
    {"step", "served"},
    {"worker", "evaluate"},
    {"train"},
    {"tune", "registry"},
)


def imports(path: Path) -> set[str]:
    """Project modules imported anywhere in the file, as dotted names (dfcvae.x, pipeline.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("dfcvae", "pipeline")}


# The shard package's own layers, and what it may import from the rest of dfcvae.
SHARD_LAYERS = ({"format"}, {"tar", "writer", "plan", "slots"}, {"loader"})
SHARDS_IMPORT_ONLY = {"config", "internals"}


def graph(package: Path = ROOT / "dfcvae") -> dict[str, set[str]]:
    """Module (or subpackage) of `package` -> the ones of `package` it imports."""
    prefix = ".".join(package.relative_to(ROOT).parts)
    files = {p.stem: [p] for p in package.glob("*.py") if p.stem != "__init__"}
    files |= {p.parent.name: sorted(p.parent.glob("*.py")) for p in package.glob("*/__init__.py")}
    depth = prefix.count(".") + 1
    return {
        name: {
            part.split(".")[depth]
            for path in paths
            for part in imports(path)
            if part.startswith(prefix + ".") and part.count(".") >= depth and part.split(".")[depth] in files
        }
        - {name}
        for name, paths in files.items()
    }


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_dfcvae_modules_import_each_other_without_cycles():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


@pytest.mark.parametrize(("package", "layers"), [("dfcvae", LAYERS), ("dfcvae/shards", SHARD_LAYERS)])
def test_every_module_sits_in_a_layer_and_imports_only_its_own_or_lower_layers(package, layers):
    layer = {name: i for i, names in enumerate(layers) for name in names}
    edges = graph(ROOT / package)
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"
    assert set(edges) == set(layer), f"place these modules in the layers: {sorted(set(edges) ^ set(layer))}"
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer[b] > layer[a])
    assert not upward, f"imports that point up the layers: {upward}"


def test_the_shard_package_imports_only_dfcvae_config_and_internals():
    outside = graph()["shards"]
    assert outside <= SHARDS_IMPORT_ONLY, f"dfcvae.shards imports {sorted(outside - SHARDS_IMPORT_ONLY)}"


def test_dfcvae_never_imports_pipeline():
    offenders = {
        p.name: sorted(n for n in imports(p) if n.startswith("pipeline")) for p in (ROOT / "dfcvae").rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_readmes_layout_lists_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") : readme.index("## Using it")]
    listed = {line.split()[0] for line in layout.splitlines() if line.split()}
    modules = {f"dfcvae/{p.name}" for p in (ROOT / "dfcvae").glob("*.py") if p.stem != "__init__"}
    modules |= {p.name for p in (ROOT / "dfcvae" / "shards").glob("*.py") if p.stem != "__init__"}
    assert not modules - listed, f"add to the README's layout: {sorted(modules - listed)}"
