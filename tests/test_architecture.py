"""Dependencies point one way: services -> shared -> third-party; no service imports another."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import REPO_ROOT


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def python_files(folder: str) -> list[Path]:
    return sorted((REPO_ROOT / folder).rglob("*.py"))


def test_shared_never_imports_services():
    offenders = {
        str(p.relative_to(REPO_ROOT)): m
        for p in python_files("shared")
        for m in imported_modules(p)
        if m.split(".")[0] == "services"
    }
    assert not offenders


def test_no_service_imports_another_service():
    services = [p for p in (REPO_ROOT / "services").iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert services
    offenders = []
    for service in services:
        for path in service.rglob("*.py"):
            for module in imported_modules(path):
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1 and parts[1] != service.name:
                    offenders.append(f"{path.relative_to(REPO_ROOT)} imports {module}")
    assert not offenders
