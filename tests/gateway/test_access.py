"""Who may use the gateway (its login) and how it reaches services that require an API key."""

from __future__ import annotations

import pytest

from tests.conftest import start_server
from tests.gateway.conftest import gateway_env
from tests.gateway.test_api import chat
from tests.harness import spawn_gateway

KEY = "gateway-test-key"


@pytest.fixture(scope="module")
def keyed_llm_server(data_dir, tmp_path_factory):
    server = start_server("llm", data_dir, tmp_path_factory.mktemp("keyed-llm"), env={"MODELWORKS_API_KEY": KEY})
    yield server
    server.stop()


def test_the_login_guards_the_app_and_the_api_key_reaches_the_services(
    keyed_llm_server, diffusion_server, finetune_stack, tmp_path
):
    from gradio_client import Client
    from gradio_client.exceptions import AppError, AuthenticationError

    targets = (keyed_llm_server.address, diffusion_server.address, finetune_stack.address)
    guarded = spawn_gateway(
        tmp_path / "guarded", gateway_env(*targets, MODELWORKS_GATEWAY_AUTH="ada:s3cret", MODELWORKS_API_KEY=KEY)
    )
    keyless = spawn_gateway(tmp_path / "keyless", gateway_env(*targets))
    try:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(guarded.address, verbose=False)
        with pytest.raises(ValueError, match="Could not login"):  # gradio answers a wrong password with 400
            Client(guarded.address, auth=("ada", "wrong"), verbose=False)
        reply, note = chat(Client(guarded.address, auth=("ada", "s3cret"), verbose=False), "hello")
        assert reply and "Stopped because" in note

        with pytest.raises(AppError) as excinfo:
            chat(Client(keyless.address, verbose=False), "hello")
        assert "refused the gateway's API key" in str(excinfo.value)
    finally:
        assert guarded.stop() == 0
        assert keyless.stop() == 0
