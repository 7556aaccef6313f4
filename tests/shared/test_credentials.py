"""Compose's generated secrets, and settings that read secrets from files."""

from __future__ import annotations

import stat

import pytest

from services.gateway.config import GatewayConfig
from shared.credentials import init
from shared.settings import Settings, load_settings


def test_the_first_start_makes_every_secret_and_later_starts_keep_them(tmp_path):
    folder = tmp_path / "secrets"
    assert sorted(init(folder, {})) == ["api_key", "gateway_auth", "redis_password"]
    first = {p.name: p.read_text() for p in folder.iterdir()}
    assert set(first) == {"api_key", "gateway_auth", "redis.conf", "redis_password"}
    assert first["redis.conf"] == f"requirepass {first['redis_password']}\n"
    assert first["gateway_auth"].startswith("admin:") and len(first["api_key"]) >= 32
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in folder.iterdir())
    assert init(folder, {}) == []
    assert {p.name: p.read_text() for p in folder.iterdir()} == first
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "no temporary file left"


def test_the_operators_own_values_are_used_and_a_changed_one_replaces_the_stored_one(tmp_path):
    folder = tmp_path / "secrets"
    init(folder, {"MODELWORKS_API_KEY": "the-operators-key-1", "MODELWORKS_GATEWAY_AUTH": "ada:pw"})
    assert (folder / "api_key").read_text() == "the-operators-key-1"
    assert (folder / "gateway_auth").read_text() == "ada:pw"
    assert init(folder, {"MODELWORKS_API_KEY": "the-operators-key-1", "MODELWORKS_GATEWAY_AUTH": "ada:pw"}) == []
    assert init(folder, {"MODELWORKS_API_KEY": "a-rotated-key-00002"}) == ["api_key"]
    assert (folder / "api_key").read_text() == "a-rotated-key-00002"
    assert (folder / "gateway_auth").read_text() == "ada:pw", "an unset variable keeps what is stored"


def test_a_lost_redis_config_is_made_again_from_the_stored_password(tmp_path):
    folder = tmp_path / "secrets"
    init(folder, {})
    (folder / "redis.conf").unlink()
    init(folder, {})
    assert (folder / "redis.conf").read_text() == f"requirepass {(folder / 'redis_password').read_text()}\n"


def test_services_and_the_web_app_read_their_secrets_from_the_files(tmp_path):
    folder = tmp_path / "secrets"
    init(folder, {"MODELWORKS_API_KEY": "the-operators-key-1", "MODELWORKS_GATEWAY_AUTH": "ada:pw"})
    settings = load_settings(
        environ={
            "MODELWORKS_API_KEY_FILE": str(folder / "api_key"),
            "MODELWORKS_REDIS_PASSWORD_FILE": str(folder / "redis_password"),
            "MODELWORKS_REDIS_URL": "redis://redis:6379/0",
        }
    )
    assert settings.key_ring().resolve("the-operators-key-1").name == "admin"
    password = (folder / "redis_password").read_text()
    assert settings.redis_address == f"redis://:{password}@redis:6379/0"
    files = {"MODELWORKS_API_KEY_FILE": "api_key", "MODELWORKS_GATEWAY_AUTH_FILE": "gateway_auth"}
    gateway = GatewayConfig.from_environ({variable: str(folder / name) for variable, name in files.items()})
    assert gateway.api_key.get_secret_value() == "the-operators-key-1" and gateway.credentials == ("ada", "pw")


def test_a_missing_secret_file_is_a_settings_error_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="api_key_file: cannot read"):
        load_settings(environ={"MODELWORKS_API_KEY_FILE": str(tmp_path / "absent")})


@pytest.mark.parametrize(
    "url,expected",
    [
        ("redis://redis:6379/0", "redis://:p%40ss@redis:6379/0"),
        ("redis://[::1]:6379/0", "redis://:p%40ss@[::1]:6379/0"),
        ("rediss://user@host/1", "rediss://user:p%40ss@host/1"),
        ("redis://:given@host/0", "redis://:given@host/0"),
        ("unix:///run/redis.sock?db=1", "unix:///run/redis.sock?db=1&password=p%40ss"),
    ],
)
def test_the_redis_password_joins_the_url_as_written(url, expected):
    assert Settings(redis_url=url, redis_password="p@ss").redis_address == expected


def test_two_keys_with_one_secret_are_refused():
    with pytest.raises(ValueError, match="the same secret"):
        Settings(api_key="one-secret-for-both", api_keys=[{"name": "ada", "key": "one-secret-for-both"}])


def test_metrics_listen_on_loopback_by_default():
    assert Settings().metrics_bind_address == "127.0.0.1"
    assert GatewayConfig().metrics_bind_address == "127.0.0.1"
