"""The gateway's settings: where the services are, who may log in, and how much load it lets through.

Read from the environment (the variables ARCHITECTURE.md names), validated by pydantic. The gateway does
not read the services' YAML: it is a client and may run on another host.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

from shared.addresses import exposure_refusal, is_loopback
from shared.credentials import fill_from_files

ENV = {
    "llm_target": "MODELWORKS_LLM_TARGET",
    "diffusion_target": "MODELWORKS_DIFFUSION_TARGET",
    "finetune_target": "MODELWORKS_FINETUNE_TARGET",
    "llm_metrics_url": "MODELWORKS_LLM_METRICS_URL",
    "diffusion_metrics_url": "MODELWORKS_DIFFUSION_METRICS_URL",
    "finetune_metrics_url": "MODELWORKS_FINETUNE_METRICS_URL",
    "worker_metrics_url": "MODELWORKS_WORKER_METRICS_URL",
    "api_key": "MODELWORKS_API_KEY",
    "api_key_file": "MODELWORKS_API_KEY_FILE",
    "auth": "MODELWORKS_GATEWAY_AUTH",
    "auth_file": "MODELWORKS_GATEWAY_AUTH_FILE",
    "port": "MODELWORKS_GATEWAY_PORT",
    "concurrency_limit": "MODELWORKS_GATEWAY_CONCURRENCY_LIMIT",
    "max_queue_size": "MODELWORKS_GATEWAY_MAX_QUEUE_SIZE",
    "metrics_port": "MODELWORKS_GATEWAY_METRICS_PORT",
    "published_on": "MODELWORKS_PUBLISHED_ON",
    "bind_address": "MODELWORKS_BIND_ADDRESS",
    "metrics_bind_address": "MODELWORKS_METRICS_BIND_ADDRESS",
    "allow_unauthenticated": "MODELWORKS_ALLOW_UNAUTHENTICATED",
}


class GatewayConfig(BaseModel):
    llm_target: str = "127.0.0.1:50051"
    diffusion_target: str = "127.0.0.1:50052"
    finetune_target: str = "127.0.0.1:50053"
    # shown as links on the System tab (what a browser can reach, which may differ from the targets)
    llm_metrics_url: str = "http://127.0.0.1:9101/metrics"
    diffusion_metrics_url: str = "http://127.0.0.1:9102/metrics"
    finetune_metrics_url: str = "http://127.0.0.1:9103/metrics"
    worker_metrics_url: str = "http://127.0.0.1:9104/metrics"
    api_key: SecretStr | None = None
    api_key_file: Path | None = Field(None, description="read api_key from this file (compose's generated secret)")
    auth: SecretStr | None = Field(None, description="user:password for the login page; unset: no login")
    auth_file: Path | None = Field(None, description="read auth from this file")
    port: int = Field(7860, ge=0, le=65535, description="HTTP port of the web app")
    concurrency_limit: int = Field(8, ge=1, description="calls per action running at once; more wait in line")
    max_queue_size: int = Field(64, ge=1, description="calls waiting in line; past it a user is asked to retry")
    metrics_port: int = Field(9105, ge=-1, description="Prometheus port of the gateway; -1 disables")
    published_on: str | None = Field(
        None, description="the host address compose publishes the port on; beyond loopback a login is required"
    )
    bind_address: str = Field("127.0.0.1", description="the interface the web app listens on")
    metrics_bind_address: str = Field("127.0.0.1", description="the interface its Prometheus endpoint listens on")
    allow_unauthenticated: bool = Field(
        False, description="DANGEROUS: listen beyond loopback with no login; anyone who reaches it uses the stack"
    )

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return fill_from_files(data, (("api_key_file", "api_key"), ("auth_file", "auth")))

    @field_validator("auth")
    @classmethod
    def _user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            user, _, password = value.get_secret_value().partition(":")
            if not user or not password:
                raise ValueError("MODELWORKS_GATEWAY_AUTH must be user:password")
        return value

    @model_validator(mode="after")
    def _login_when_published(self) -> GatewayConfig:
        if self.published_on and not is_loopback(self.published_on) and self.auth is None:
            raise ValueError(
                f"the web app is published on {self.published_on} (MODELWORKS_BIND), beyond this host, but has no "
                "login: set MODELWORKS_GATEWAY_AUTH=user:password, or publish on 127.0.0.1"
            )
        return self

    def exposure_refusal(self, bind_address: str) -> str | None:
        """Why the web app must not listen on `bind_address` (beyond loopback with no login), or None."""
        return exposure_refusal(
            bind_address,
            protected=self.auth is not None,
            allow_unauthenticated=self.allow_unauthenticated,
            remedy="set a login (MODELWORKS_GATEWAY_AUTH=user:password)",
        )

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.auth is None:
            return None
        user, _, password = self.auth.get_secret_value().partition(":")
        return user, password

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        environ = os.environ if environ is None else environ
        return cls.model_validate({field: environ[var] for field, var in ENV.items() if environ.get(var, "").strip()})
