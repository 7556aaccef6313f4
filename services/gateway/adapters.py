"""Adapters a picker offers: those the fine-tune service lists for a kind and base model."""

from __future__ import annotations

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import call_or_warn


def adapter_names(clients: ServiceClients, kind: int, base_model: str | None) -> list[str]:
    """Sorted names of the `kind` adapters trained on `base_model`; empty (with a warning) when the fine-tune
    service is down, so the base model stays usable."""
    adapters = call_or_warn(
        clients.finetune_service,
        "list_adapters",
        lambda: clients.finetune.ListAdapters(pb.ListAdaptersRequest(kind=kind), timeout=QUICK_CALL_S).adapters,
        [],
    )
    return sorted(a.name for a in adapters if base_model is None or a.base_model == base_model)
