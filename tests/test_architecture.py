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


def _imports_torch(*modules: str) -> bool:
    """Whether importing `modules` in a fresh interpreter pulls in torch (or transformers, diffusers)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'peft') if m in sys.modules]\n"
        + "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_finetune_api_never_imports_torch():
    loaded = _imports_torch(
        "services.finetune.__main__", "services.finetune.app", "services.finetune.servicer", "services.finetune.api"
    )
    assert loaded == "", f"the fine-tune API imports {loaded}"


def test_library_code_never_imports_a_recipe():
    offenders = {
        str(p.relative_to(REPO_ROOT)): m
        for p in [*python_files("shared"), *python_files("services")]
        if "recipes" not in p.parts
        for m in imported_modules(p)
        if m.startswith("services.finetune.recipes")
    }
    assert not offenders


def test_the_gateway_never_imports_torch_or_loads_a_model():
    """The web app is a client of the services' gRPC APIs only: no torch, transformers or diffusers."""
    loaded = _imports_torch("services.gateway.__main__", "services.gateway.app")
    assert loaded == "", f"the gateway imports {loaded}"


def test_the_gateway_reaches_modelworks_only_through_the_generated_stubs():
    # the adapter-name rule, the log format, the loopback rule and reading secret files, all torch-free
    allowed_shared = {"shared.adapters", "shared.logs", "shared.addresses", "shared.credentials", "shared.channels"}
    offenders = {
        f"{p.relative_to(REPO_ROOT)}: {m}"
        for p in python_files("services/gateway")
        for m in imported_modules(p)
        if m.split(".")[0] == "shared" and m not in allowed_shared
    }
    assert not offenders


def test_the_openai_api_never_imports_torch():
    """The OpenAI API is a client of the services' gRPC APIs: no torch, transformers or diffusers."""
    loaded = _imports_torch("services.openai.__main__", "services.openai.app", "shared.settings")
    assert loaded == "", f"the OpenAI API imports {loaded}"


def test_the_openai_api_reaches_the_services_only_through_the_generated_stubs():
    allowed_shared = {"shared.addresses", "shared.logs", "shared.auth", "shared.settings", "shared.metrics",
                      "shared.channels"}  # fmt: skip
    offenders = {
        f"{p.relative_to(REPO_ROOT)}: {m}"
        for p in python_files("services/openai")
        for m in imported_modules(p)
        if m.split(".")[0] == "shared" and m not in allowed_shared
    }
    assert not offenders


def test_the_cli_is_a_client_of_the_generated_stubs_only():
    """`modelworks` imports no service and nothing of shared: it runs wherever the stubs and grpcio are."""
    offenders = {
        f"{p.relative_to(REPO_ROOT)}: {m}"
        for p in python_files("modelworks_cli")
        for m in imported_modules(p)
        if m.split(".")[0] in ("services", "shared", "torch", "transformers", "diffusers", "peft")
    }
    assert not offenders


def test_the_cli_never_imports_torch():
    modules = ("modelworks_cli.__main__", "modelworks_cli.jobs", "modelworks_cli.images", "modelworks_cli.chat")
    loaded = _imports_torch(*modules)
    assert loaded == "", f"the CLI imports {loaded}"
