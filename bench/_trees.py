"""fedmfs of another commit, for benchmarks that measure a change against the code before it.

:func:`checkout` extracts a commit's files (``git archive``) into a directory; :data:`TREE_IMPORTS` is
the code a child process runs first (with ``tree`` bound to that directory, or empty for this tree) so
that ``import fedmfs`` (and ``fedmfs.edge``, ``fedmfs.coordinator``, ``fedmfs.export``, which live in
top-level folders of the source) comes from it. Used by bench/device_memory.py and bench/sim_speed.py.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["TREE_IMPORTS", "checkout"]

HERE = Path(__file__).resolve().parent.parent

TREE_IMPORTS = '''
if tree:
    import importlib.abc as _abc, importlib.util as _util, os as _os, sys as _sys
    _roots = {"fedmfs": "fedmfs", "fedmfs.edge": "edge", "fedmfs.coordinator": "coordinator",
              "fedmfs.export": "export"}

    class _Tree(_abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in _roots:
                d = _os.path.join(tree, _roots[name])
                return _util.spec_from_file_location(name, _os.path.join(d, "__init__.py"),
                                                     submodule_search_locations=[d])
            return None

    _sys.meta_path.insert(0, _Tree())
'''


def checkout(ref: str, into: Path) -> str:
    """The files of commit ``ref`` extracted into ``into``; returns the commit's full sha."""
    sha = subprocess.run(["git", "-C", str(HERE), "rev-parse", ref], check=True, capture_output=True,
                         text=True).stdout.strip()
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(HERE), "archive", sha], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return sha
