"""The compiled (mypyc) hot modules: used only while their build matches the sources, and the
plain modules still give the same results (see src/virtshift/native.py)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtshift import native

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _fake_build(tmp_path: Path) -> tuple[dict[str, object], Path, Path]:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "__init__.py").write_text("")
    (src / "pkg" / "hot.py").write_text("X = 1\n")
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "pkg" / f"hot{SUFFIX}").write_bytes(b"\x7fELF")
    manifest: dict[str, object] = {
        "version": native.MANIFEST_VERSION, "ext_suffix": SUFFIX,
        "modules": {"pkg.hot": f"pkg/hot{SUFFIX}"},
        "sources": {"pkg/__init__.py": native.digest(src / "pkg" / "__init__.py"),
                    "pkg/hot.py": native.digest(src / "pkg" / "hot.py")},
    }
    return manifest, src, lib


def test_a_build_matching_its_sources_is_usable(tmp_path: Path) -> None:
    manifest, src, lib = _fake_build(tmp_path)
    assert native.problem(manifest, src, lib, SUFFIX) is None


def test_an_edited_source_makes_the_build_unusable(tmp_path: Path) -> None:
    manifest, src, lib = _fake_build(tmp_path)
    (src / "pkg" / "hot.py").write_text("X = 2\n")
    assert native.problem(manifest, src, lib, SUFFIX) == "pkg/hot.py changed since the build"
    (src / "pkg" / "hot.py").unlink()
    assert native.problem(manifest, src, lib, SUFFIX) == "pkg/hot.py is gone"


@pytest.mark.parametrize("change, reason", [
    ({"version": 0}, "the build's manifest is of another version"),
    ({"ext_suffix": ".cpython-312-x86_64-linux-gnu.so"},
     "the build is for another Python (.cpython-312-x86_64-linux-gnu.so)"),
    ({"modules": {}}, "the build's manifest is incomplete"),
    ({"sources": None}, "the build's manifest is incomplete"),
    ({"modules": {"pkg.cold": "pkg/cold.so"}}, "the build lacks pkg.cold"),
])
def test_a_build_for_something_else_is_unusable(tmp_path: Path, change: dict[str, object],
                                                reason: str) -> None:
    manifest, src, lib = _fake_build(tmp_path)
    assert native.problem({**manifest, **change}, src, lib, SUFFIX) == reason


def test_install_without_a_build_keeps_the_plain_modules(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "state", native.state)  # restored afterwards
    monkeypatch.delenv(native.PURE_ENV, raising=False)
    finders = list(sys.meta_path)
    assert native.install(lib_dir=tmp_path / "nothing") is False
    assert native.state == "plain Python (no compiled build: make setup makes one)"
    assert sys.meta_path == finders


def _loaded_from(env: dict[str, str]) -> dict[str, object]:
    code = ("import json, importlib; from virtshift import native\n"
            "print(json.dumps({'state': native.state, 'compiled': [m for m in native.COMPILED"
            " if native.in_use(importlib.import_module(m))]}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_the_setup_build_is_in_use() -> None:
    """``make setup`` compiled the modules, and a fresh interpreter loads every one of them from
    that build (run make setup after editing a source, or this fails)."""
    env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    got = _loaded_from(env)
    assert got["compiled"] == list(native.COMPILED), got["state"]
    assert str(got["state"]).startswith("compiled")


def test_the_pure_python_switch_loads_no_compiled_module() -> None:
    got = _loaded_from({**os.environ, native.PURE_ENV: "1"})
    assert got == {"state": f"plain Python ({native.PURE_ENV} is set)", "compiled": []}


def test_the_plain_modules_pass_the_admission_and_managed_fields_tests() -> None:
    """The same source runs as plain Python wherever no build is (another install, an edited
    tree): the behaviour tests of the compiled modules pass that way too."""
    tests = ["test_admission_fast.py", "test_admission.py", "test_admission_cow.py",
             "test_schema.py", "test_managedfields_fast.py", "test_patch.py",
             "test_meta_qualified_key.py", "test_meta_uid.py", "test_migration_admission.py"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         *[str(Path(__file__).with_name(t)) for t in tests]],
        env={**os.environ, native.PURE_ENV: "1"}, capture_output=True, text=True, cwd=ROOT,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
