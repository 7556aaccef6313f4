"""Process settings: one YAML file validated by pydantic, every field overridable by environment.

Built once per process in `__main__` and passed down; nothing else reads the environment.

Environment overrides are `MODELWORKS_<FIELD>` for top-level fields (`MODELWORKS_DATA_DIR`,
`MODELWORKS_REDIS_URL`, `MODELWORKS_API_KEY`) and `MODELWORKS_<SECTION>__<FIELD>` for nested ones
(`MODELWORKS_LLM__MAX_BATCH_SIZE=8`). Values starting with `[` or `{` are parsed as YAML, so lists and mappings work too
(`MODELWORKS_MODELS='[{name: m, kind: llm, source: "hf:Qwen/Qwen2.5-0.5B-Instruct"}]'`).
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from shared.addresses import exposure_refusal, is_loopback
from shared.auth import ADMIN, SCOPES, Caller, KeyRing, key_digest
from shared.credentials import fill_from_files
from shared.diffusion_families import FamilyName
from shared.quantization import QuantizationName

ENV_PREFIX = "MODELWORKS_"
CONFIG_ENV = "MODELWORKS_CONFIG"
DEFAULT_CONFIG_PATH = Path("config/modelworks.yaml")

ModelKind = Literal["llm", "diffusion", "embedding", "controlnet"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MiB = 1024 * 1024


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DiffusionDefaults(_Section):
    """What a diffusion request gets for the fields it leaves unset (unset here: the model's own)."""

    width: int | None = Field(None, ge=8, multiple_of=8)
    height: int | None = Field(None, ge=8, multiple_of=8)
    steps: int | None = Field(None, ge=1, description="unset: the family's (25 SD, 30 SDXL, 28 SD3 and Flux)")
    guidance_scale: float | None = Field(
        None, ge=0, description="unset: the family's (7.5 SD, 5 SDXL, 7 SD3, 3.5 Flux)"
    )
    scheduler: str | None = Field(None, description="a scheduler name; unset: the checkpoint's own scheduler")
    family: FamilyName = Field("auto", description="sd, sdxl, sd3 or flux; auto: read from model_index.json")
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 tokens of a prompt (SD3, Flux); unset: the family's (256 SD3, 512 Flux)"
    )


class ControlNetOptions(_Section):
    """A ControlNet model serves the diffusion models of one family, beside them in the diffusion service."""

    base_family: Literal["sd", "sdxl", "flux"] = Field(
        "sd", description="the family whose UNet (Flux: transformer) it was trained beside"
    )


class EmbeddingDefaults(_Section):
    """How an embedding model turns its hidden states into one vector, unless a request says otherwise."""

    pooling: Literal["mean", "last", "cls"] = Field(
        "mean", description="mean of the tokens (BERT-style encoders), last token (decoder embedders), or the first"
    )
    normalize: bool = True
    matryoshka: bool = Field(
        False, description="the model was trained so that a prefix of its vector is an embedding too (dimensions)"
    )


class ModelEntry(_Section):
    """One served model: a name clients use, and where its weights come from."""

    name: str
    kind: ModelKind
    source: str = Field(
        description="hf:<repo id>[@revision], a local directory, builtin:<name>, gguf:<file> "
        "or gguf:package:<python package>/<file>"
    )
    gguf_file: str | None = Field(None, description="with an hf: source: the repository's GGUF file to convert")
    dtype: DTypeName = "auto"
    quantization: QuantizationName = Field(
        "none",
        description="load the weights quantized: bnb-nf4 (4-bit NormalFloat, double quantized, computing in dtype), "
        "bnb-int8, or fp8 (GPUs of compute capability 8.9+); LLM and embedding models",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    trust_remote_code: bool = False
    tool_parser: Literal["auto", "hermes", "llama3", "mistral"] = Field(
        "auto", description="how the model writes tool calls (auto: detected from its chat template, else hermes)"
    )
    diffusion: DiffusionDefaults = DiffusionDefaults()
    embedding: EmbeddingDefaults = EmbeddingDefaults()
    controlnet: ControlNetOptions = ControlNetOptions()

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError("model names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return name

    @model_validator(mode="after")
    def _check_gguf(self) -> ModelEntry:
        if self.gguf_file and not self.source.startswith("hf:"):
            raise ValueError("gguf_file names a file of an hf: repository; for a local file use source gguf:<path>")
        if (self.gguf_file or self.source.startswith("gguf:")) and self.kind != "llm":
            raise ValueError("GGUF checkpoints are LLMs: use kind llm")
        if self.quantization != "none" and self.kind in ("diffusion", "controlnet"):
            raise ValueError("quantization applies to llm and embedding models; diffusion models load unquantized")
        return self


class LLMSettings(_Section):
    port: int = 50051
    metrics_port: int = 9101
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together in one step")
    max_waiting_requests: int = Field(256, ge=1, description="queue bound; past it requests get RESOURCE_EXHAUSTED")
    max_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="prompt tokens prefilled per engine step while other sequences decode: a longer prompt is "
        "prefilled in chunks, each in the same forward as their decode tokens, so they never stall for a whole "
        "prompt (unset: measured, a chunk takes about a third of a decode step)",
    )
    kv_cache_bytes: int | None = Field(
        None,
        ge=1,
        description="memory for the running sequences' KV cache and the loaded adapters' LoRA slots; a request "
        "is admitted only when its prompt and max_new_tokens fit next to the running ones, and refused up front "
        "(RESOURCE_EXHAUSTED) if it could never fit (unset: 80% of the GPU memory free after loading, or 4 GiB on "
        "a CPU)",
    )
    cuda_graphs: bool = Field(
        False,
        description="replay decode steps as CUDA graphs (GPU only; decode-only steps of base-model rows, one "
        "graph per batch-size bucket and KV size class): fewer kernel launches a step",
    )
    onednn_linears: bool = Field(
        True,
        description="on the CPU, run the model's linear layers through oneDNN's matmul (faster than torch's "
        "default BLAS call for decode steps' skinny products); false: torch's default",
    )
    max_prompt_tokens: int = Field(8192, ge=1, description="longer prompts are refused up front")
    prefix_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="memory for the KV of prompt prefixes reused across requests (system prompts); 0 turns it off",
    )
    prefix_cache_block_tokens: int = Field(16, ge=1, description="prefixes are cached and matched in such blocks")
    max_prompt_chars: int = Field(
        1_000_000, ge=1, description="characters a prompt, conversation or Tokenize text may have (checked first)"
    )
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_limit: int = Field(4096, ge=1)
    max_embed_inputs: int = Field(256, ge=1, description="texts one Embed call may have")
    max_embed_input_tokens: int = Field(
        8192, ge=1, description="tokens one embedded text may have (the model's own context caps it too)"
    )
    max_embed_batch_tokens: int = Field(
        16384, ge=1, description="tokens (padded) one embedding forward runs at once; more inputs take several"
    )
    grammar_cache_size: int = Field(
        64, ge=1, description="compiled output formats (JSON schemas, regexes, grammars, tool sets) kept per model"
    )
    max_grammar_compile_s: float = Field(
        10.0, gt=0, description="a response_format or tool set that takes longer to compile is refused"
    )
    max_grammar_chars: int = Field(
        65536, ge=1, description="characters a response_format's schema, regex or grammar may have"
    )
    adapter_cache_size: int = Field(8, ge=1, description="LoRA adapters kept loaded per model (LRU)")
    max_lora_rank: int = Field(
        64, ge=1, le=4096, description="largest LoRA rank an adapter may have (checked at CreateJob and at load)"
    )
    allow_embedding_lora_targets: bool = Field(
        False,
        description="let adapters target lm_head or the embeddings (a LoRA slot there is vocabulary-sized: "
        "refused unless allowed)",
    )
    max_message_bytes: int = Field(4 * MiB, ge=1024, description="largest gRPC message the LLM service accepts")
    max_concurrent_rpcs: int = Field(1024, ge=1, description="RPCs in flight at once; past it new ones are refused")


class DiffusionSettings(_Section):
    port: int = 50052
    metrics_port: int = 9102
    max_width: int = Field(1024, ge=8)
    max_height: int = Field(1024, ge=8)
    max_steps: int = Field(150, ge=1)
    max_num_images: int = Field(8, ge=1, description="images one request may ask for")
    max_prompt_chars: int = Field(
        20_000, ge=1, description="characters a prompt or negative prompt may have (the text encoder reads 77 tokens)"
    )
    max_batch_images: int = Field(8, ge=1, description="images run through the UNet together")
    max_waiting_requests: int = Field(64, ge=1)
    batch_window_ms: float = Field(5.0, ge=0, description="how long a batch waits for compatible requests")
    adapter_cache_size: int = Field(4, ge=1)
    attention_slicing: bool = False
    vae_tiling: bool = False
    compile: bool = Field(False, description="torch.compile the UNet (GPU hosts; slow first request)")
    max_message_bytes: int = Field(
        64 * MiB, ge=1024, description="largest gRPC message (init images in, PNGs out) the diffusion service takes"
    )
    max_concurrent_rpcs: int = Field(256, ge=1, description="RPCs in flight at once; past it new ones are refused")

    @model_validator(mode="after")
    def _check_batch_budget(self) -> DiffusionSettings:
        if self.max_num_images > self.max_batch_images:
            raise ValueError(
                f"max_num_images ({self.max_num_images}) must not exceed max_batch_images ({self.max_batch_images}): "
                "one request's images run in one batch"
            )
        return self


class FinetuneSettings(_Section):
    port: int = 50053
    metrics_port: int = 9103
    worker_metrics_port: int = 9104
    queue: str = Field("finetune", description="the Celery queue jobs go to (one per pool of workers)")
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1, description="largest dataset file an upload may send")
    max_adapter_import_bytes: int = Field(
        2 * 1024 * 1024 * 1024, ge=1, description="largest LoRA file ImportAdapter takes (Flux LoRAs reach 1-2 GB)"
    )
    max_dataset_records: int = Field(1_000_000, ge=1)
    max_record_chars: int = Field(200_000, ge=1, description="longest JSONL line")
    max_zip_members: int = Field(100_000, ge=1)
    max_unzipped_bytes: int = Field(4 * 1024**3, ge=1, description="bound on a zip's total uncompressed size")
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1, description="bound on one uncompressed zip member")
    max_image_pixels: int = Field(64 * 1024 * 1024, ge=1, description="bound on one image's width × height")
    max_steps_limit: int = Field(1_000_000, ge=1, description="largest max_steps a job may ask for")
    lease_ttl_s: float = Field(30.0, gt=0, description="a running job's lease; expired: another worker resumes it")
    lease_renew_s: float = Field(5.0, gt=0, description="how often a worker renews its jobs' leases")
    sweep_interval_s: float = Field(10.0, gt=0, description="how often workers requeue jobs whose lease expired")
    visibility_timeout_s: int = Field(
        7 * 24 * 3600, ge=1, description="Celery's redelivery bound; longer than any job (leases recover crashes)"
    )
    max_bad_steps: int = Field(10, ge=1, description="NaN/Inf-loss steps skipped before a job fails")
    dataloader_workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="processes per training rank that decode and batch the data; 0: the training process; "
        "unset: up to 4 per GPU rank (the CPU is free while the GPU trains), 0 when training on the CPU",
    )
    max_attempts: int = Field(
        5, ge=1, description="times a job may start (resumes after a lost worker count) before it is failed"
    )
    progress_interval_s: float = Field(
        0.5, ge=0, description="progress events are written at most this often (0: every step); cancel checks too"
    )
    devices: int = Field(1, ge=1, description="GPUs one worker trains on (DDP over them when more than one)")
    max_message_bytes: int = Field(
        8 * MiB, ge=1024, description="largest gRPC message (an upload chunk) the fine-tune service accepts"
    )
    max_concurrent_rpcs: int = Field(512, ge=1, description="RPCs in flight at once; past it new ones are refused")
    max_watchers: int = Field(
        256, ge=1, description="WatchJob streams open at once (they share one Redis pool); past it RESOURCE_EXHAUSTED"
    )
    max_train_pixels: int = Field(
        2 * 1024**3,
        ge=1,
        description="bound on a diffusion job's records × resolution² × aspect (the pixels one epoch decodes), "
        "checked at CreateJob",
    )
    min_image_side: int = Field(16, ge=1, description="training images with a shorter side are refused at upload")
    max_messages_per_record: int = Field(512, ge=1, description="chat messages one JSONL record may have")
    max_json_depth: int = Field(64, ge=2, description="nesting depth a JSONL record may have")
    max_queued_jobs: int = Field(
        100, ge=1, description="jobs one API key may have queued or running at once (per-key setting overrides it)"
    )
    max_concurrent_exports: int = Field(
        1,
        ge=1,
        description="ExportAdapter calls merging at once (each loads its base model); past it RESOURCE_EXHAUSTED",
    )
    export_timeout_s: float = Field(3600.0, gt=0, description="an export that takes longer is stopped and fails")
    job_retention_days: float = Field(
        30.0, gt=0, description="finished jobs (record, events, folder) are removed this long after they end"
    )
    max_events_per_job: int = Field(
        100_000, ge=100, description="a job's event stream is trimmed to about this many events (XADD MAXLEN ~)"
    )
    redis_socket_timeout_s: float = Field(10.0, gt=0, description="a Redis call that hangs this long fails")
    redis_connect_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _check_lease(self) -> FinetuneSettings:
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError("lease_renew_s must be shorter than lease_ttl_s, or leases lapse between renewals")
        return self


class OpenAISettings(_Section):
    """The OpenAI-compatible HTTP API: a gRPC client of the three services, with the keys of this config."""

    port: int = Field(8000, ge=0, le=65535)
    metrics_port: int = Field(9106, ge=-1)
    llm_target: str = Field("127.0.0.1:50051", description="the LLM service's gRPC address")
    diffusion_target: str = Field("127.0.0.1:50052", description="the diffusion service's gRPC address")
    finetune_target: str = Field("127.0.0.1:50053", description="the fine-tune service's gRPC address")
    max_request_bytes: int = Field(
        64 * MiB, ge=1024, description="largest request body but a file upload (an image edit's, say); past it 413"
    )
    max_upload_bytes: int = Field(
        512 * MiB, ge=1024, description="largest file a POST /v1/files may upload (multipart, streamed to the store)"
    )
    image_url_ttl_s: float = Field(3600.0, gt=0, description="how long an image returned as a URL stays served")
    image_url_bytes: int = Field(
        512 * MiB, ge=MiB, description="memory the URL-served images may hold; past it the oldest are dropped"
    )
    public_url: str | None = Field(
        None, description="the base URL clients reach this server by (image URLs); unset: the request's own"
    )
    model_list_ttl_s: float = Field(
        5.0, ge=0, description="how long the services' model listings are reused to tell base models from adapters"
    )


class ApiKeyEntry(_Section):
    """One named key: what it may do and how much of the service it may take."""

    name: str
    key: SecretStr | None = Field(None, description="the key itself (better from env: MODELWORKS_API_KEYS)")
    key_sha256: str | None = Field(None, description="hex SHA-256 of the key, so the config holds no secret")
    scopes: list[Literal["inference", "images", "finetune", "admin"]] = Field(
        default_factory=lambda: ["inference", "images", "finetune"]
    )
    requests_per_minute: int | None = Field(None, ge=1, description="unset: no rate limit")
    max_queued_jobs: int | None = Field(None, ge=1, description="unset: finetune.max_queued_jobs")
    max_concurrent_requests: int | None = Field(
        None, ge=1, description="calls (a generation stream, a job watcher) the key may have in flight; unset: no cap"
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError("key names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return name

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"API key {self.name!r}: set exactly one of key and key_sha256")
        if self.key_sha256 is not None and not _SHA256_RE.match(self.key_sha256):
            raise ValueError(f"API key {self.name!r}: key_sha256 must be 64 lowercase hex digits")
        if self.key is not None and len(self.key.get_secret_value()) < 16:
            raise ValueError(f"API key {self.name!r}: use at least 16 characters")
        return self

    @property
    def digest(self) -> str:
        return self.key_sha256 or key_digest(self.key.get_secret_value())

    def caller(self) -> Caller:
        return Caller(
            self.name,
            frozenset(self.scopes),
            self.requests_per_minute,
            self.max_queued_jobs,
            self.max_concurrent_requests,
        )


class Settings(_Section):
    data_dir: Path = Path("var")
    redis_url: str | None = None
    embedded_redis_port: int = Field(
        6379, description="port of the Redis that `make run` starts when redis_url is unset"
    )
    api_key: SecretStr | None = Field(None, description="one key with every scope (the key named 'admin')")
    api_key_file: Path | None = Field(None, description="read api_key from this file (compose's generated secret)")
    redis_password: SecretStr | None = Field(None, description="Redis' requirepass, added to redis_url")
    redis_password_file: Path | None = Field(None, description="read redis_password from this file")
    api_keys: list[ApiKeyEntry] = Field(default_factory=list, description="named, scoped keys")
    bind_address: str = Field(
        "127.0.0.1",
        description="the interface every server (gRPC, metrics) listens on; beyond loopback an API key is required",
    )
    metrics_bind_address: str = Field(
        "127.0.0.1",
        description="the interface the Prometheus endpoints listen on; they have no login, so keep them off the "
        "network unless a scraper needs them (compose's Prometheus does, inside the compose network)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="DANGEROUS: serve on a non-loopback address with no API key; anyone who reaches the port may "
        "run, train and delete everything",
    )
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    allow_downloads: bool = Field(False, description="let serving download hf: weights missing from the cache")
    require_gpu: bool = Field(
        False,
        description="refuse to start unless a CUDA device is usable (the GPU compose services set it, so a host "
        "whose GPU is missing fails loudly instead of serving on the CPU)",
    )
    published_on: str | None = Field(
        None,
        description="the host address compose publishes the ports on (MODELWORKS_BIND); any address but a "
        "loopback one requires api_key",
    )
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_connection_age_s: float = Field(
        300.0,
        gt=0,
        description="clients are asked to reconnect after this long (calls in flight finish first), so clients "
        "balancing over replicas by DNS (round_robin) find replicas added since they connected",
    )
    models: list[ModelEntry] = Field(default_factory=list)
    llm: LLMSettings = LLMSettings()
    diffusion: DiffusionSettings = DiffusionSettings()
    finetune: FinetuneSettings = FinetuneSettings()
    openai: OpenAISettings = OpenAISettings()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        """`*_file` settings name a file holding the secret (compose's generated ones), read once here."""
        if not isinstance(data, dict):
            return data
        return fill_from_files(data, (("api_key_file", "api_key"), ("redis_password_file", "redis_password")))

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        names = [k.name for k in self.api_keys] + (["admin"] if self.api_key else [])
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"API key names must be unique; repeated: {', '.join(repeated)} (api_key is named 'admin')"
            )
        digests = [entry.digest for entry in self.api_keys]
        if self.api_key is not None:
            digests.append(key_digest(self.api_key.get_secret_value()))
        if len(set(digests)) != len(digests):
            raise ValueError("two API keys (api_key or api_keys entries) are the same secret: give each its own key")
        if self.published_on and not is_loopback(self.published_on) and not self.keys_configured:
            raise ValueError(
                f"the ports are published on {self.published_on} (MODELWORKS_BIND), beyond this host, but no API "
                "key is set: set MODELWORKS_API_KEY, or publish on 127.0.0.1"
            )
        return self

    @property
    def keys_configured(self) -> bool:
        return self.api_key is not None or bool(self.api_keys)

    def exposure_refusal(self, bind_address: str) -> str | None:
        """Why a server must not listen on `bind_address` (beyond loopback with no key), or None."""
        return exposure_refusal(
            bind_address,
            protected=self.keys_configured,
            allow_unauthenticated=self.allow_unauthenticated,
            remedy="set an API key (MODELWORKS_API_KEY or api_keys)",
        )

    def key_ring(self) -> KeyRing:
        """Every configured key: `api_key` as the admin key named 'admin', then `api_keys`."""
        callers = {entry.digest: entry.caller() for entry in self.api_keys}
        if self.api_key is not None:
            callers[key_digest(self.api_key.get_secret_value())] = Caller(ADMIN, frozenset(SCOPES))
        return KeyRing(callers)

    def models_of_kind(self, kind: ModelKind) -> list[ModelEntry]:
        return [m for m in self.models if m.kind == kind]

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def redis_address(self) -> str:
        """`redis_url` (with `redis_password` added), or the embedded Redis that `make run` starts."""
        url = self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"
        if self.redis_password is None:
            return url
        parts = urllib.parse.urlsplit(url)
        if parts.password:
            return url
        password = urllib.parse.quote(self.redis_password.get_secret_value(), safe="")
        if parts.scheme == "unix":  # a socket path has no host: the password goes in the query
            query = "&".join(filter(None, [parts.query, f"password={password}"]))
            return f"unix://{parts.path}?{query}"
        user = urllib.parse.quote(parts.username or "", safe="")
        host = parts.netloc.rpartition("@")[2]  # host and port as written, IPv6 brackets included
        return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read the YAML config, apply `MODELWORKS_*` overrides, and validate the result."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = Path(environ.get(CONFIG_ENV, DEFAULT_CONFIG_PATH))
    data: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config must be a mapping at the top level")
        data = loaded
    elif CONFIG_ENV in environ:
        raise FileNotFoundError(f"{CONFIG_ENV} points to {path}, which does not exist")
    return Settings.model_validate(apply_env_overrides(data, environ))


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay `MODELWORKS_A__B=value` onto `data["a"]["b"]`, parsing values as YAML scalars or documents."""
    merged = {**data}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_ENV:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX) :].split("__")]
        if path[0] not in Settings.model_fields:
            continue  # other programs' MODELWORKS_* variables (e.g. the gateway's targets)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return merged


def _parse_env_value(raw: str) -> Any:
    """Lists and mappings are YAML; scalars stay strings for pydantic to coerce; empty means unset."""
    text = raw.strip()
    if not text:
        return None
    if text[0] in "[{":
        return yaml.safe_load(text)
    return raw
