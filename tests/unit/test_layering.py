"""The package layering, read from the source's syntax trees (nothing is imported or run).

Each rule has an ALLOWED set of the offenders the code had when the rule was written. The sets
may only shrink: a new offender fails its test, and an entry that no longer offends fails
`test_allowed_sets_hold_only_current_offenders`, so the set is emptied as the code is fixed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHALICELIB = ROOT / "chalicelib"

# (b) Modules outside chalicelib/storage/ that import pynamodb, as "path -> module imported".
# Being removed by the storage work of issue 15; empty it when that work is merged.
ALLOWED_PYNAMODB: frozenset[str] = frozenset()

# (c) Functions in chalicelib/services/*.py with `Any` in a parameter or return annotation, as
# "module.qualified_name". Being typed by the service work of issue 15; empty it when merged.
ALLOWED_ANY_IN_SERVICES: frozenset[str] = frozenset()

# (d) I/O imported by chalicelib/domain/, as "path -> module imported". The rate-limit arithmetic
# still reads the gateway's answer classes; empty it when the delivery work of issue 15 is merged.
ALLOWED_DOMAIN_IO: frozenset[str] = frozenset()

# What doing I/O means for the domain core: AWS and HTTP clients, and the layers that use them.
IO_MODULES = (
    "boto3",
    "botocore",
    "pynamodb",
    "requests",
    "chalicelib.services",
    "chalicelib.storage",
    "chalicelib.gateway",
)


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(module, names imported from it) for every import in `path`, at any depth (inside
    functions too), relative ones resolved; `import x` has no names."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield module, [alias.name for alias in node.names]


def is_within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == prefix or module.startswith(f"{prefix}.") for prefix in prefixes)


def imports_of(paths: list[Path], prefixes: tuple[str, ...]) -> set[str]:
    """Each module under `prefixes` that one of `paths` imports, as "path -> module"; for
    `from package import name`, the module is `package.name` when only that is under them."""
    found = set()
    for path in paths:
        for module, names in imports(path):
            if is_within(module, prefixes):
                found.add(f"{relative(path)} -> {module}")
            else:
                found.update(
                    f"{relative(path)} -> {module}.{name}"
                    for name in names
                    if is_within(f"{module}.{name}", prefixes)
                )
    return found


def mentions_any(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == "Any":
            return True
        if isinstance(node, ast.Attribute) and node.attr == "Any":
            return True
        quoted = isinstance(node, ast.Constant) and isinstance(node.value, str)
        if quoted and mentions_any(ast.parse(str(node.value), mode="eval").body):
            return True
    return False


def functions_with_any(path: Path) -> set[str]:
    """Each function in `path` whose signature mentions Any, as "module.qualified_name"."""
    found: set[str] = set()

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                arguments = child.args
                parameters = [
                    *arguments.posonlyargs,
                    *arguments.args,
                    *arguments.kwonlyargs,
                    *([arguments.vararg] if arguments.vararg else []),
                    *([arguments.kwarg] if arguments.kwarg else []),
                ]
                annotations = [p.annotation for p in parameters] + [child.returns]
                if any(mentions_any(a) for a in annotations):
                    found.add(".".join([path.stem, *scope, child.name]))
                visit(child, [*scope, child.name])
            elif isinstance(child, ast.ClassDef):
                visit(child, [*scope, child.name])
            else:
                visit(child, scope)

    visit(ast.parse(path.read_text(), str(path)), [])
    return found


def pynamodb_outside_storage() -> set[str]:
    storage = CHALICELIB / "storage"
    paths = [p for p in python_files(CHALICELIB) if storage not in p.parents]
    return imports_of(paths, ("pynamodb",))


def any_in_service_signatures() -> set[str]:
    return {
        name
        for path in sorted((CHALICELIB / "services").glob("*.py"))
        for name in functions_with_any(path)
    }


def io_in_domain() -> set[str]:
    return imports_of(python_files(CHALICELIB / "domain"), IO_MODULES)


def report(rule: str, offenders: set[str], allowed: frozenset[str]) -> set[str]:
    """Print the offenders still allowed (a to-do list in the output); return the new ones."""
    tolerated = sorted(offenders & allowed)
    if tolerated:
        print(f"{rule}: {len(tolerated)} allowed offender(s) left:")
        for entry in tolerated:
            print(f"  {entry}")
    return offenders - allowed


def test_nothing_in_chalicelib_imports_the_dev_stack_or_the_tests():
    """Given the Lambda package's source, when its imports are read, then none is of devstack/
    or tests/ (Chalice ships all of chalicelib/, and neither runs in Lambda)."""
    offenders = imports_of(python_files(CHALICELIB), ("devstack", "tests"))
    assert offenders == set()


def test_only_the_storage_package_imports_pynamodb():
    """Given chalicelib/ outside storage/, when its imports are read, then none is of pynamodb
    beyond the shrinking ALLOWED_PYNAMODB."""
    new = report("pynamodb outside storage/", pynamodb_outside_storage(), ALLOWED_PYNAMODB)
    assert new == set(), "only chalicelib/storage/ may import pynamodb"


def test_no_service_signature_has_any():
    """Given the functions in chalicelib/services/, when their annotations are read, then no
    parameter or return type mentions Any beyond the shrinking ALLOWED_ANY_IN_SERVICES."""
    new = report("Any in service signatures", any_in_service_signatures(), ALLOWED_ANY_IN_SERVICES)
    assert new == set(), "service signatures name their types (a domain dataclass, a Protocol)"


def test_the_domain_core_imports_nothing_doing_io():
    """Given chalicelib/domain/, when its imports are read, then none is an AWS or HTTP client
    or a layer using one, beyond the shrinking ALLOWED_DOMAIN_IO."""
    new = report("I/O imported by domain/", io_in_domain(), ALLOWED_DOMAIN_IO)
    assert new == set(), "the domain core is pure: no I/O, time passed in"


def test_allowed_sets_hold_only_current_offenders():
    """Given the ALLOWED sets, when the code is read, then each entry still offends: a fixed
    offender must leave its set, so that the sets only shrink."""
    stale = {
        "ALLOWED_PYNAMODB": sorted(ALLOWED_PYNAMODB - pynamodb_outside_storage()),
        "ALLOWED_ANY_IN_SERVICES": sorted(ALLOWED_ANY_IN_SERVICES - any_in_service_signatures()),
        "ALLOWED_DOMAIN_IO": sorted(ALLOWED_DOMAIN_IO - io_in_domain()),
    }
    assert {name: entries for name, entries in stale.items() if entries} == {}, (
        "remove these fixed entries from tests/unit/test_layering.py"
    )


def test_the_rules_see_imports_and_annotations_written_every_way(tmp_path, monkeypatch):
    """Given imports written absolute, relative, nested in a function and as `from x import y`,
    and Any spelt bare, qualified or in a string, when the rules read them, then each is found
    (a rule that reads nothing would pass on any code)."""
    package = tmp_path / "chalicelib" / "domain"
    package.mkdir(parents=True)
    (tmp_path / "chalicelib" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import boto3\nfrom ..storage import models\n")
    (package / "b.py").write_text("def f():\n    from pynamodb.models import Model\n")
    (package / "c.py").write_text("from chalicelib import gateway\n")
    service = tmp_path / "chalicelib" / "services"
    service.mkdir()
    (service / "s.py").write_text(
        "import typing\n"
        "def bare(x: Any) -> None: ...\n"
        "def returns() -> typing.Any: ...\n"
        "class C:\n"
        "    def quoted(self, *rows: 'list[Any]') -> None: ...\n"
        "    def clean(self, x: int) -> int: ...\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    monkeypatch.setitem(globals(), "CHALICELIB", tmp_path / "chalicelib")

    assert io_in_domain() == {
        "chalicelib/domain/a.py -> boto3",
        "chalicelib/domain/a.py -> chalicelib.storage",
        "chalicelib/domain/b.py -> pynamodb.models",
        "chalicelib/domain/c.py -> chalicelib.gateway",
    }
    assert any_in_service_signatures() == {"s.bare", "s.returns", "s.C.quoted"}
