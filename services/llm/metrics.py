"""LLM serving metrics, named after vLLM's set (`vllm:time_to_first_token_seconds` and friends)."""

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)

TIME_TO_FIRST_TOKEN = Histogram(
    "modelworks_llm_time_to_first_token_seconds",
    "Arrival to first generated token",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "modelworks_llm_inter_token_latency_seconds",
    "Time between consecutive generated tokens",
    ["model"],
    buckets=_TOKEN_BUCKETS,
)
E2E_LATENCY = Histogram(
    "modelworks_llm_e2e_request_latency_seconds", "Arrival to the last token", ["model"], buckets=_LATENCY_BUCKETS
)
PROMPT_TOKENS = Counter("modelworks_llm_prompt_tokens", "Prompt tokens prefilled", ["model"])
GENERATION_TOKENS = Counter("modelworks_llm_generation_tokens", "Tokens generated", ["model"])
REQUESTS_FINISHED = Counter(
    "modelworks_llm_request_success", "Requests finished, by finish reason", ["model", "finish_reason"]
)
REQUESTS_WAITING = Gauge("modelworks_llm_num_requests_waiting", "Requests in the waiting queue", ["model"])
REQUESTS_RUNNING = Gauge("modelworks_llm_num_requests_running", "Sequences in the running batch", ["model"])
BATCH_SIZE = Histogram(
    "modelworks_llm_batch_size", "Sequences per decode step", ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
ADAPTER_LOADS = Counter("modelworks_llm_adapter_loads", "LoRA adapters loaded into memory", ["model"])
ADAPTER_EVICTIONS = Counter("modelworks_llm_adapter_evictions", "LoRA adapters evicted from memory", ["model"])
ADAPTERS_LOADED = Gauge("modelworks_llm_adapters_loaded", "LoRA adapters held in memory", ["model"])
PREFIX_CACHE_QUERIES = Counter(
    "modelworks_llm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", ["model"]
)
PREFIX_CACHE_HITS = Counter(
    "modelworks_llm_prefix_cache_hits", "Prompt tokens whose KV came from the prefix cache (not prefilled)", ["model"]
)
PREFIX_CACHE_BYTES = Gauge("modelworks_llm_prefix_cache_bytes", "Memory held by the prefix cache", ["model"])
KV_CACHE_BYTES = Gauge("modelworks_llm_kv_cache_bytes", "Memory held by the running sequences' KV cache", ["model"])
KV_CACHE_BUDGET_BYTES = Gauge(
    "modelworks_llm_kv_cache_budget_bytes", "The KV cache's budget (llm.kv_cache_bytes)", ["model"]
)

EMBED_INPUTS = Counter("modelworks_llm_embedding_inputs", "Texts embedded", ["model"])
EMBED_TOKENS = Counter("modelworks_llm_embedding_tokens", "Tokens of the texts embedded", ["model"])
EMBED_LATENCY = Histogram(
    "modelworks_llm_embedding_request_latency_seconds",
    "Arrival to the vectors of an Embed call",
    ["model"],
    buckets=_LATENCY_BUCKETS,
)
EMBED_WAITING = Gauge("modelworks_llm_embedding_requests_waiting", "Embed calls in the waiting queue", ["model"])


class ModelMetrics:
    """The per-model children, looked up once: the decode loop records several samples per token."""

    def __init__(self, model: str):
        self.time_to_first_token = TIME_TO_FIRST_TOKEN.labels(model)
        self.inter_token_latency = INTER_TOKEN_LATENCY.labels(model)
        self.e2e_latency = E2E_LATENCY.labels(model)
        self.prompt_tokens = PROMPT_TOKENS.labels(model)
        self.generation_tokens = GENERATION_TOKENS.labels(model)
        self.requests_running = REQUESTS_RUNNING.labels(model)
        self.batch_size = BATCH_SIZE.labels(model)
        self.prefix_cache_queries = PREFIX_CACHE_QUERIES.labels(model)
        self.prefix_cache_hits = PREFIX_CACHE_HITS.labels(model)
        self.prefix_cache_bytes = PREFIX_CACHE_BYTES.labels(model)
        self.kv_cache_bytes = KV_CACHE_BYTES.labels(model)
        self.kv_cache_budget_bytes = KV_CACHE_BUDGET_BYTES.labels(model)
