"""An editable install whose extension was not rebuilt after its C++ changed would run the
old kernels against the new Python, silently: unmask._C carries the hash of the csrc
sources it was built from (cmake/source_hash.cmake), and unmask.native compares it with
the source tree beside it."""

import shutil
import subprocess
from pathlib import Path

import pytest

from unmask import native
from tests.helpers import requires_extension

CSRC = Path(native.__file__).resolve().parents[2] / "csrc"


@requires_extension
def test_the_extension_was_built_from_these_sources():
    if not (CSRC / "bindings.cpp").is_file():
        pytest.skip("no source tree beside the package (an installed wheel)")
    assert native._C.source_hash() == native.source_tree_hash(CSRC), "rebuild: pip install --no-build-isolation -e ."
    assert native.stale_build() is None


def test_the_hash_sees_every_source_change_and_nothing_else(tmp_path):
    tree = tmp_path / "csrc"
    (tree / "cpu").mkdir(parents=True)
    (tree / "cpu" / "commit.cpp").write_text("int floor = 1;\n")
    (tree / "commit.h").write_text("#pragma once\n")
    base = native.source_tree_hash(tree)
    (tree / "cpu" / "commit.cpp").write_text("int floor = 0;\n")
    changed = native.source_tree_hash(tree)
    assert changed != base
    (tree / "cpu" / "commit.cpp").write_text("int floor = 1;\n")
    assert native.source_tree_hash(tree) == base
    (tree / "notes.txt").write_text("not a source")
    (tree / "cpu" / "commit.cpp.orig").write_text("an editor's backup")
    assert native.source_tree_hash(tree) == base
    (tree / "cuda").mkdir()
    (tree / "cuda" / "commit.cu").write_text("")
    assert native.source_tree_hash(tree) != base, "a new source, even an empty one"
    shutil.rmtree(tree / "cuda")
    (tree / "commit.h").rename(tree / "commit2.h")
    assert native.source_tree_hash(tree) != base, "a renamed source"


@requires_extension
def test_cmakes_hash_equals_pythons(tmp_path):
    """cmake/source_hash.cmake and native.source_tree_hash agree on a tree of their own
    (nested directories, every suffix, names whose order differs by byte and by case)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    script = Path(native.__file__).resolve().parents[2] / "cmake" / "source_hash.cmake"
    if not script.is_file():
        pytest.skip("no source tree beside the package (an installed wheel)")
    tree = tmp_path / "csrc"
    for name, text in [("a.h", "1"), ("B.h", "2"), ("cpu/x.cpp", "3"), ("cpu/x_y.cpp", "4"), ("cuda/k.cu", "5"),
                       ("cuda/k.cuh", "6"), ("simt/include/cuda_runtime.h", "7")]:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    out = tmp_path / "hash.h"
    subprocess.run([cmake, f"-DROOT={tmp_path}", f"-DOUT={out}", "-P", str(script)], check=True)
    assert f'"{native.source_tree_hash(tree)}"' in out.read_text()
