"""Read one sample from a running service's Prometheus endpoint."""

from __future__ import annotations

import urllib.request


def metric_value(server, name: str, **labels) -> float:
    return metric_at(server.metrics_port, name, **labels)


def metric_at(port: int, name: str, **labels) -> float:
    """One sample from the Prometheus endpoint on 127.0.0.1:`port`."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(f"{name}{{") and all(part in line for part in wanted):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{','.join(wanted)}}} not exported")
