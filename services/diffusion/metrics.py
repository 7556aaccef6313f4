"""Diffusion serving metrics, all labelled by model."""

from prometheus_client import Counter, Gauge, Histogram

IMAGES = Counter("modelworks_diffusion_images", "Images generated", ["model"])
DENOISING_STEPS = Counter("modelworks_diffusion_denoising_steps", "Denoising steps run (per batch)", ["model"])
REQUEST_LATENCY = Histogram(
    "modelworks_diffusion_request_latency_seconds",
    "Arrival to result of a request",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
)
QUEUE_WAIT = Histogram(
    "modelworks_diffusion_queue_wait_seconds",
    "Arrival to the start of the request's batch",
    ["model"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60),
)
BATCH_IMAGES = Histogram(
    "modelworks_diffusion_batch_images", "Images per pipeline call", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
REQUESTS_WAITING = Gauge("modelworks_diffusion_num_requests_waiting", "Requests in the waiting queue", ["model"])
ADAPTER_LOADS = Counter("modelworks_diffusion_adapter_loads", "LoRA adapters loaded", ["model"])
ADAPTER_EVICTIONS = Counter("modelworks_diffusion_adapter_evictions", "LoRA adapters evicted", ["model"])
