"""The gateway's Prometheus metrics: calls to the services by action and outcome."""

from prometheus_client import Counter

CALLS = Counter(
    "modelworks_gateway_calls", "Calls the gateway made to the services, by action and outcome", ["action", "outcome"]
)
