"""No module of the package imports another that imports it back, directly or through others: a
cycle makes the import order matter and hides which module owns what. Lazy imports inside
functions count too (they only defer the cycle)."""

from pathlib import Path

import qwen2vl
from tests.helpers.import_graph import cycles, import_graph


def test_the_package_has_no_import_cycles():
    assert cycles(import_graph(Path(qwen2vl.__file__).parent)) == []


def test_the_graph_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import f\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
