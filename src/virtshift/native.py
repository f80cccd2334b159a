"""Compiled builds of virtshift's hot pure-Python modules, used only while they match the sources.

Most of an API create is admission, schema validation and managed fields: plain Python walking
dicts. ``scripts/build-native.py`` (run by ``make setup``) compiles the modules in
:data:`COMPILED` with mypyc into ``build/native/lib/`` beside ``src/``, and writes a manifest with a
SHA-256 of every source file the build read (those modules and everything of virtshift they
import). When virtshift is imported, :func:`install` checks the manifest against the sources as
they are now and, if every hash matches, puts a finder in front of the import system that loads
those modules from the build. Otherwise (an edited source, another Python, no build) the plain
modules are used, unchanged. ``VIRTSHIFT_PURE_PYTHON=1`` always uses the plain modules.

This module is never compiled itself: it runs before any of them is imported.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any, Final

# The modules mypyc compiles: pure functions over JSON values, typed, with no monkeypatching.
COMPILED: Final = (
    "virtshift.api.admission",
    "virtshift.api.admission._k8s",
    "virtshift.api.admission._util",
    "virtshift.api.admission.cdi",
    "virtshift.api.admission.compute",
    "virtshift.api.admission.config",
    "virtshift.api.admission.migration",
    "virtshift.api.admission.network",
    "virtshift.api.admission.pvc",
    "virtshift.api.admission.quantity",
    "virtshift.api.admission.storage",
    "virtshift.api.admission.vm",
    "virtshift.api.admission.vmi",
    "virtshift.api.admission.vmi_defaults",
    "virtshift.api.admission.vmirs",
    "virtshift.api.jsonvalue",
    "virtshift.api.managedfields",
    "virtshift.api.schema",
    "virtshift.api.smp",
    "virtshift.api.ssa",
    "virtshift.apiserver.meta",
)
GROUP: Final = "virtshift_native"  # mypyc's shared library: virtshift_native__mypyc
PURE_ENV: Final = "VIRTSHIFT_PURE_PYTHON"
MANIFEST_VERSION: Final = 1
SRC_ROOT: Final = Path(__file__).resolve().parent.parent  # the directory holding virtshift/
BUILD_DIR: Final = SRC_ROOT.parent / "build" / "native" / "lib"

# What install() found: "compiled (N modules)" or why the plain modules are in use.
state = "not checked"


def source_path(module: str, src_root: Path = SRC_ROOT) -> Path:
    """The source file of a virtshift module (a package's ``__init__.py``)."""
    base = src_root.joinpath(*module.split("."))
    package = base / "__init__.py"
    return package if package.is_file() else base.with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def problem(manifest: Mapping[str, Any], src_root: Path, lib_dir: Path,
            ext_suffix: str) -> str | None:
    """Why the build described by ``manifest`` cannot be used with these sources (None: it
    can). Pure apart from reading the files the manifest names."""
    if manifest.get("version") != MANIFEST_VERSION:
        return "the build's manifest is of another version"
    if manifest.get("ext_suffix") != ext_suffix:
        return f"the build is for another Python ({manifest.get('ext_suffix')})"
    modules = manifest.get("modules")
    sources = manifest.get("sources")
    if not isinstance(modules, dict) or not isinstance(sources, dict) or not modules:
        return "the build's manifest is incomplete"
    for rel, want in sources.items():
        path = src_root / rel
        try:
            if digest(path) != want:
                return f"{rel} changed since the build"
        except OSError:
            return f"{rel} is gone"
    for name, rel in modules.items():
        if not (lib_dir / rel).is_file():
            return f"the build lacks {name}"
    return None


class _Loader(importlib.machinery.ExtensionFileLoader):
    """Loads one compiled module; a compiled package keeps its source directory as its
    ``__path__`` (mypyc sets the build's), so plain submodules are still found."""

    def __init__(self, name: str, path: str, package_dirs: list[str] | None) -> None:
        super().__init__(name, path)
        self.package_dirs = package_dirs

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        module = super().create_module(spec)
        if self.package_dirs is not None:
            module.__path__ = list(self.package_dirs)
        return module


class NativeFinder:
    """A meta path finder for the compiled modules of one build; every other name is left to
    the usual finders."""

    def __init__(self, lib_dir: Path, modules: Mapping[str, str],
                 packages: Mapping[str, Sequence[str]]) -> None:
        self._files = {name: lib_dir / rel for name, rel in modules.items()}
        self._packages = {name: list(dirs) for name, dirs in packages.items()}

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        file = self._files.get(fullname)
        if file is None:
            return None
        dirs = self._packages.get(fullname)
        return importlib.util.spec_from_file_location(
            fullname, file, loader=_Loader(fullname, str(file), dirs),
            submodule_search_locations=dirs)


def install(lib_dir: Path = BUILD_DIR, src_root: Path = SRC_ROOT) -> bool:
    """Use the compiled modules if a build matching the sources exists (see the module doc)."""
    global state
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        state = f"plain Python ({PURE_ENV} is set)"
        return False
    try:
        manifest = json.loads((lib_dir / "manifest.json").read_text())
    except FileNotFoundError:
        state = "plain Python (no compiled build: make setup makes one)"
        return False
    except (OSError, ValueError) as e:
        state = f"plain Python (unreadable build manifest: {e})"
        return False
    reason = problem(manifest, src_root, lib_dir, importlib.machinery.EXTENSION_SUFFIXES[0])
    if reason is not None:
        state = f"plain Python ({reason}: make setup rebuilds)"
        return False
    packages = {name: [str(source_path(name, src_root).parent)]
                for name in manifest["modules"]
                if source_path(name, src_root).name == "__init__.py"}
    if not any(isinstance(f, NativeFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, NativeFinder(lib_dir, manifest["modules"], packages))
    state = f"compiled ({len(manifest['modules']) - 1} modules, mypyc)"
    return True


def in_use(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a compiled build."""
    spec = getattr(module, "__spec__", None)
    return spec is not None and isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)
