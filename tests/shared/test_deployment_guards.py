"""What keeps a deployment from failing quietly: open ports without a key, a GPU service without a GPU,
an image with the wrong torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from services.gateway.config import GatewayConfig
from shared.settings import load_settings
from tests.harness import REPO_ROOT


@pytest.mark.parametrize("address", ["0.0.0.0", "192.0.2.7", "::"])
def test_ports_published_beyond_the_host_need_an_api_key(address):
    with pytest.raises(ValidationError, match="MODELWORKS_API_KEY"):
        load_settings(environ={"MODELWORKS_PUBLISHED_ON": address})
    assert load_settings(environ={"MODELWORKS_PUBLISHED_ON": address, "MODELWORKS_API_KEY": "k"}).api_key
    with pytest.raises(ValidationError, match="MODELWORKS_GATEWAY_AUTH"):
        GatewayConfig.from_environ({"MODELWORKS_PUBLISHED_ON": address})
    assert GatewayConfig.from_environ({"MODELWORKS_PUBLISHED_ON": address, "MODELWORKS_GATEWAY_AUTH": "a:b"}).auth


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_ports_published_on_loopback_need_no_key(address):
    assert load_settings(environ={"MODELWORKS_PUBLISHED_ON": address}).api_key is None
    assert GatewayConfig.from_environ({"MODELWORKS_PUBLISHED_ON": address}).auth is None


@pytest.mark.parametrize(
    "module",
    [["services.llm", "--port", "0", "--metrics-port", "-1"], ["services.finetune.worker", "--metrics-port", "-1"]],
)
def test_a_service_that_requires_a_gpu_refuses_to_start_without_one(tmp_path, module):
    """This machine has no GPU: the service exits at once and says what to check, before loading anything."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path), "redis_url": "redis://127.0.0.1:1/0", "models": []}))
    result = subprocess.run(
        [sys.executable, "-m", *module, "--config", str(config)],
        env={"PATH": "/usr/bin:/bin", "MODELWORKS_REQUIRE_GPU": "true", "MODELWORKS_LOG_FORMAT": "text"},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "require_gpu is set" in result.stderr and "CPU build" in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("variant,ok", [("cpu", True), ("gpu", False)])
def test_the_image_build_checks_its_torch_variant(variant, ok):
    """The image build runs docker/check_torch.py after installing torch; this venv's torch is a CPU build."""
    result = subprocess.run(
        [sys.executable, "docker/check_torch.py", variant], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert (result.returncode == 0) is ok, result.stderr
    if not ok:
        assert "needs a CUDA build of torch" in result.stderr
    dockerfile = (REPO_ROOT / "docker/Dockerfile").read_text()
    install = (REPO_ROOT / "docker/install_torch.sh").read_text()
    assert "install_torch.sh" in dockerfile and 'check_torch.py" "$variant"' in install
