"""Compile virtshift's hot pure-Python modules with mypyc into build/native/lib/ (see
src/virtshift/native.py). Does nothing when the existing build matches the sources.

Run from anywhere: ``.venv/bin/python scripts/build-native.py [--force]`` (``make setup`` runs it).
Needs a C compiler and Python's headers (scripts/setup-system.sh installs gcc and python3-dev).
"""

from __future__ import annotations

import argparse
import ast
import importlib.machinery
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ["VIRTSHIFT_PURE_PYTHON"] = "1"  # this script reads the sources, not an old build

from virtshift import native  # noqa: E402


def imported_modules(module: str) -> set[str]:
    """The virtshift modules ``module`` imports (absolute imports, as the project writes them)."""
    tree = ast.parse(native.source_path(module).read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] == "virtshift" and _exists(name):
                out.add(name)
    return out


def _exists(module: str) -> bool:
    return native.source_path(module).is_file()


def closure(modules: tuple[str, ...]) -> list[str]:
    """The modules and every virtshift module they import, directly or not (with the packages
    that hold them, whose ``__init__`` runs first)."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(imported_modules(name) - seen)
    return sorted(seen)


def wanted_sources() -> dict[str, str]:
    """Relative source path -> SHA-256, for everything the build reads."""
    out = {}
    for name in closure(native.COMPILED):
        path = native.source_path(name)
        out[str(path.relative_to(native.SRC_ROOT))] = native.digest(path)
    return out


def build(lib: Path, tmp: Path) -> dict[str, str]:
    """Compile into ``lib``: module name -> its shared library, relative to ``lib``."""
    from mypyc.build import mypycify  # the dev dependencies' mypy ships mypyc
    from setuptools import setup

    paths = [str(native.source_path(m).relative_to(ROOT)) for m in native.COMPILED]
    os.chdir(ROOT)  # mypy reads its settings from pyproject.toml
    extensions = mypycify(paths, opt_level="3", debug_level="0", group_name=native.GROUP,
                          target_dir=str(tmp / "c"))
    warnings.filterwarnings("ignore", module="setuptools")  # its notes on our pyproject.toml
    setup(name="virtshift-native", ext_modules=extensions, py_modules=[], packages=[],
          script_args=["-q", "build_ext", "--build-lib", str(lib), "--build-temp",
                       str(tmp / "obj")])
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    modules = {m: "/".join(m.split(".")) + ("/__init__" if native.source_path(m).name ==
                                            "__init__.py" else "") + suffix
               for m in native.COMPILED}
    modules[f"{native.GROUP}__mypyc"] = f"{native.GROUP}__mypyc{suffix}"
    missing = [rel for rel in modules.values() if not (lib / rel).is_file()]
    if missing:
        raise SystemExit(f"build-native: mypyc did not produce {', '.join(missing)}")
    return modules


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args()
    lib = native.BUILD_DIR
    work = lib.parent
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    sources = wanted_sources()
    if (lib / "manifest.json").is_file() and not args.force:
        try:
            old = json.loads((lib / "manifest.json").read_text())
        except ValueError:
            old = {}
        if native.problem(old, native.SRC_ROOT, lib, suffix) is None and \
                old.get("sources") == sources:
            return
    print(f"build-native: compiling {len(native.COMPILED)} modules with mypyc "
          "(about a minute)...", flush=True)
    started = time.monotonic()
    shutil.rmtree(work, ignore_errors=True)
    staging = work / "staging"
    modules = build(staging, work / "tmp")
    # Hash the sources again: an edit made while compiling must not be recorded as built.
    if wanted_sources() != sources:
        raise SystemExit("build-native: the sources changed while compiling; run it again")
    manifest = {"version": native.MANIFEST_VERSION, "ext_suffix": suffix, "modules": modules,
                "sources": sources}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    staging.rename(lib)
    shutil.rmtree(work / "tmp", ignore_errors=True)
    print(f"build-native: done in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
