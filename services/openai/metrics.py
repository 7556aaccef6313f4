"""The OpenAI API server's own metrics (the services keep theirs): requests by route and status, latency to
the response's start, and the streams open now."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "modelworks_openai_requests", "HTTP requests answered, by route and status", ["method", "route", "status"]
)
LATENCY = Histogram(
    "modelworks_openai_request_duration_seconds",
    "Time to the response's start (a stream's first chunk), by route",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
STREAMS_OPEN = Gauge("modelworks_openai_streams_open", "Streaming responses being sent now")
