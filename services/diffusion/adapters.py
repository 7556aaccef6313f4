"""Diffusion LoRA adapters: loaded by name on first use into the pipeline, kept in a bounded LRU.

Adapters are in diffusers' LoRA format (`pytorch_lora_weights.safetensors`, as written by
`StableDiffusionPipeline.save_lora_weights`) plus the store's `modelworks.json`. A LoRA whose keys
match no layer loads without complaint in diffusers and changes nothing, so every load is checked to
have injected layers. Runs on the engine thread only, between pipeline calls.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from services.diffusion import metrics
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition

log = logging.getLogger(__name__)


def _injected_layers(pipeline, name: str) -> int:
    count = 0
    for component in (pipeline.unet, pipeline.text_encoder):
        for module in component.modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and name in lora_a:
                count += 1
    return count


class DiffusionAdapterCache:
    def __init__(self, pipeline, store: AdapterStore, capacity: int, model_name: str, model_source: str):
        self._pipeline = pipeline
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._loaded: OrderedDict[str, None] = OrderedDict()

    def resolve(self, name: str) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread)."""
        return self._store.get_for(name, "diffusion", (self._model_name, self._model_source))

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def _discard(self, name: str) -> None:
        """Remove whatever a failed load registered, so the name is free and nothing half-loaded stays on."""
        try:
            self._pipeline.delete_adapters([name])
        except Exception:  # nothing was registered under that name
            log.debug("nothing to discard", extra={"adapter": name})
        if not self._loaded:
            self._pipeline.disable_lora()

    def activate(self, name: str | None, scale: float) -> None:
        """Make the next pipeline call use adapter `name` at `scale` (None: the base model)."""
        if name is None:
            if self._loaded:
                self._pipeline.disable_lora()
            return
        if name not in self._loaded:
            self._load(name)
        self._loaded.move_to_end(name)
        self._pipeline.enable_lora()
        self._pipeline.set_adapters([name], adapter_weights=[scale])

    def _load(self, name: str) -> None:
        self.resolve(name)
        try:
            self._pipeline.load_lora_weights(str(self._store.path(name)), adapter_name=name)
        except Exception as exc:
            self._discard(name)
            raise FailedPrecondition(f"adapter {name!r} could not be loaded into {self._model_name!r}: {exc}") from exc
        if _injected_layers(self._pipeline, name) == 0:
            self._discard(name)
            raise FailedPrecondition(f"adapter {name!r} matched no layer of {self._model_name!r}")
        self._loaded[name] = None
        while len(self._loaded) > self._capacity:  # evict only once the new one is in
            evicted, _ = self._loaded.popitem(last=False)
            self._pipeline.delete_adapters([evicted])
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": evicted, "model": self._model_name})
        metrics.ADAPTER_LOADS.labels(self._model_name).inc()
        log.info("adapter loaded", extra={"adapter": name, "model": self._model_name})
