"""The repository's shape: the package's folder import order, entry points, docker image sources, README."""

import ast
import re

from conftest import ROOT

PACKAGE = ROOT / "openvision_max"


def folder_order() -> list[str]:
    """The folders of openvision_max/README.md's table, top (imported by all) to bottom."""
    rows = re.findall(r"^\| `(\w+)/` \|", (PACKAGE / "README.md").read_text(), re.M)
    assert rows, "openvision_max/README.md lists no folders"
    return rows


def imported_modules(path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def folder_of(dotted: str, folders: list[str]) -> str | None:
    """The folder an `openvision_max.<...>` name lands in; "top" for the package's top-level modules."""
    parts = dotted.split(".")
    if parts[0] != "openvision_max":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in folders else "top"


def test_every_folder_is_placed_in_the_order():
    folders = folder_order()
    on_disk = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert sorted(folders) == on_disk


def test_imports_run_with_the_folder_order():
    folders = folder_order()
    rank = {name: i for i, name in enumerate(folders)} | {"top": len(folders)}
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        own = rel.parts[0] if len(rel.parts) > 1 else "top"
        for line, dotted in imported_modules(path):
            target = folder_of(dotted, folders)
            if target is not None and rank[target] > rank[own]:
                offences.append(f"openvision_max/{rel}:{line} ({own}/) imports {dotted} ({target}/)")
    assert not offences, "imports against the order of openvision_max/README.md:\n" + "\n".join(offences)


def test_the_check_sees_an_offence(tmp_path):
    """The parser finds function-level imports, so the test above can fail."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from openvision_max.training import loop\n")
    assert imported_modules(bad) == [(2, "openvision_max.training.loop")]
    assert folder_of("openvision_max.training.loop", folder_order()) == "training"
    assert folder_of("openvision_max.api", folder_order()) == "top"


def test_kernels_do_not_import_the_trainer():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert not [d for _, d in imported_modules(path) if d.startswith("openvision_max")], path
def test_dockerfile_copies_existing_paths():
    sources = []
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
