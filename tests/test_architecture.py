"""The layer rules of pyproject.toml ([tool.fedmfs.architecture]) hold for every import in the source.

Every ``import`` and ``from ... import`` counts, also those inside functions (a lazy import is still a
dependency), and relative imports are resolved. The checker is tested on a small fake tree first, so
this test can fail: an upward import, a sideways one, a forbidden third-party one, a module in no layer.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def source_modules(project: dict, root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, from setuptools' package list and package-dir mapping."""
    st = project["tool"]["setuptools"]
    dirs = st.get("package-dir", {})
    out = {}
    for pkg in st["packages"]:
        base = dirs.get(pkg)
        if base is None:   # a subpackage of a mapped package: below its parent's folder
            parent = max((p for p in dirs if pkg.startswith(p + ".")), key=len, default=None)
            base = (dirs[parent] + "/" + pkg[len(parent) + 1:].replace(".", "/")) if parent else pkg.replace(".", "/")
        folder = root / base
        for f in sorted(folder.glob("*.py")):
            out[pkg if f.name == "__init__.py" else f"{pkg}.{f.stem}"] = f
    return out


def imports_of(module: str, source: str, is_package: bool) -> set[str]:
    """Absolute names of everything ``source`` imports (module level or not)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                base = parts if is_package else parts[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)   # `from pkg import module`
    return found


def _room(name: str, rooms: list[str]) -> str | None:
    hits = [r for r in rooms if name == r or name.startswith(r + ".")]
    return max(hits, key=len) if hits else None


def violations(modules: dict[str, str], rules: dict, packages: set[str] = frozenset()) -> list[str]:
    """Every import of ``modules`` (name -> source) that breaks ``rules``; one line each."""
    layers = [[r.strip() for r in layer.split("|")] for layer in rules["layers"]]
    level = {room: i for i, layer in enumerate(layers) for room in layer}
    rooms = list(level)
    forbidden = rules.get("forbidden", {})
    out: list[str] = []
    for mod, src in sorted(modules.items()):
        if mod == "fedmfs":
            continue
        mine = _room(mod, rooms)
        if mine is None:
            out.append(f"{mod} is in no layer: add it to [tool.fedmfs.architecture] layers")
            continue
        seen = set()
        for name in sorted(imports_of(mod, src, mod in packages)):
            top = name.split(".")[0]
            for room, banned in forbidden.items():
                if (mod == room or mod.startswith(room + ".")) and top in banned and top not in seen:
                    seen.add(top)
                    out.append(f"{mod} imports {name}, which {room} must never import")
            theirs = _room(name, rooms) if top == "fedmfs" else None
            if theirs is None or theirs == mine or theirs in seen:
                continue
            seen.add(theirs)
            if level[theirs] < level[mine]:
                out.append(f"{mod} imports {name}: an upward import ({mine} is below {theirs})")
            elif level[theirs] == level[mine]:
                out.append(f"{mod} imports {name}: {mine} and {theirs} are rooms of one layer and stay apart")
    return out


def test_the_checker_catches_upward_sideways_forbidden_and_homeless_imports():
    fake = {
        "fedmfs.base.x": "import numpy\ndef f():\n    from fedmfs.top import cli\n",   # upward, lazily
        "fedmfs.base.y": "import torch.nn\n",                                       # forbidden
        "fedmfs.a.m": "from fedmfs.b import n\nfrom fedmfs.base.x import f\n",       # sideways (+ a fine one)
        "fedmfs.b.n": "from . import m\n",                                          # relative, inside b: fine
        "fedmfs.top": "import fedmfs.a.m, fedmfs.b.n, fedmfs.base\n",                 # downward: fine
        "fedmfs.elsewhere": "",                                                     # in no layer
    }
    rules = {"layers": ["fedmfs.top", "fedmfs.a | fedmfs.b", "fedmfs.base"], "forbidden": {"fedmfs.base": ["torch"]}}
    found = violations(fake, rules, packages={"fedmfs.top"})
    assert any("fedmfs.base.x imports fedmfs.top" in v and "upward" in v for v in found), found
    assert any("fedmfs.base.y imports torch" in v for v in found), found
    assert any("fedmfs.a.m imports fedmfs.b" in v and "stay apart" in v for v in found), found
    assert any("fedmfs.elsewhere is in no layer" in v for v in found), found
    assert len(found) == 4, found


def test_the_source_keeps_its_layers():
    project = _project()
    files = source_modules(project)
    assert {"fedmfs.core.wire.messages", "fedmfs.edge.machine", "fedmfs.coordinator.machine", "fedmfs.sim.driver"} \
        <= set(files), "the package list in pyproject.toml lost a package"
    packages = {m for m, f in files.items() if f.name == "__init__.py"}
    found = violations({m: f.read_text() for m, f in files.items()}, project["tool"]["fedmfs"]["architecture"],
                       packages)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("module", ["fedmfs.core.wire", "fedmfs.edge.machine"])
def test_relative_imports_resolve(module):
    assert imports_of(module, "from . import x\nfrom .y import z\n", module == "fedmfs.core.wire") >= {
        f"{module if module == 'fedmfs.core.wire' else 'fedmfs.edge'}.x"}
