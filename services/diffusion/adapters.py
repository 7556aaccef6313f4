"""Diffusion LoRA adapters: loaded by name on first use into the pipeline, kept in a bounded LRU.

Adapters are one `pytorch_lora_weights.safetensors` plus the store's `modelworks.json`: diffusers' LoRA format
(as each family's pipeline `save_lora_weights` writes it, and as training here does), or a file imported from
elsewhere in Kohya / A1111 keys or Flux's original names, which diffusers' loaders convert on load. A LoRA whose
keys match no layer loads without complaint in diffusers and changes nothing, so every load is checked to have
injected layers. Runs on the engine thread only, between pipeline calls.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

from services.diffusion import metrics
from shared.adapters import AdapterInfo, AdapterStore
from shared.errors import FailedPrecondition

log = logging.getLogger(__name__)

# The one file an adapter folder may hold weights in: safetensors only (a pickle could run code on load).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def _injected_layers(pipeline, internal: str) -> int:
    import torch

    count = 0
    for component in pipeline.components.values():  # UNet or transformer, and the text encoders
        if not isinstance(component, torch.nn.Module):
            continue
        for module in component.modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is not None and internal in lora_a:
                count += 1
    return count


class DiffusionAdapterCache:
    """Loaded adapters keyed by (name, version); each lives in the pipeline under an internal name.

    Internal names (`a0`, `a1`, ...) are safe as module keys whatever the adapter's own name holds (peft
    keeps adapters in `ModuleDict`s, whose keys cannot contain '.'), and a replaced adapter (a new store
    version) gets a new one, so it is loaded afresh instead of served stale.
    """

    def __init__(self, pipeline, store: AdapterStore, capacity: int, model_name: str, model_source: str):
        self._pipeline = pipeline
        self._store = store
        self._capacity = capacity
        self._model_name = model_name
        self._model_source = model_source
        self._loaded: OrderedDict[tuple[str, str], str] = OrderedDict()  # (name, version) -> internal name
        self._internal_names = itertools.count()

    def resolve(self, name: str) -> AdapterInfo:
        """Check that adapter `name` exists and fits this model (any thread)."""
        return self._store.get_for(name, "diffusion", (self._model_name, self._model_source))

    @property
    def loaded(self) -> list[str]:
        return [name for name, _ in self._loaded]

    def _discard(self, internal: str) -> None:
        """Remove whatever a failed load registered, so nothing half-loaded stays on."""
        try:
            self._pipeline.delete_adapters([internal])
        except Exception:  # nothing was registered under that name
            log.debug("nothing to discard", extra={"adapter": internal})
        if not self._loaded:
            self._pipeline.disable_lora()

    def activate(self, name: str | None, scale: float) -> None:
        """Make the next pipeline call use the store's current version of `name` at `scale` (None: the base)."""
        if name is None:
            if self._loaded:
                self._pipeline.disable_lora()
            return
        key = (name, self.resolve(name).version)
        if key not in self._loaded:
            self._load(key)
        self._loaded.move_to_end(key)
        self._pipeline.enable_lora()
        self._pipeline.set_adapters([self._loaded[key]], adapter_weights=[scale])

    def _load(self, key: tuple[str, str]) -> None:
        name = key[0]
        internal = f"a{next(self._internal_names)}"
        try:
            self._pipeline.load_lora_weights(
                str(self._store.path(name)), adapter_name=internal, weight_name=LORA_WEIGHTS, use_safetensors=True
            )
        except Exception as exc:
            self._discard(internal)
            log.warning("adapter load failed", extra={"adapter": name, "error": repr(exc)})
            raise FailedPrecondition(
                f"adapter {name!r} could not be loaded into {self._model_name!r}: its files are missing, "
                "unreadable or not a LoRA for this model's family; save or import it again"
            ) from exc
        if _injected_layers(self._pipeline, internal) == 0:
            self._discard(internal)
            raise FailedPrecondition(f"adapter {name!r} matched no layer of {self._model_name!r}")
        for stale in [k for k in self._loaded if k[0] == name]:  # a replaced version is never used again
            self._pipeline.delete_adapters([self._loaded.pop(stale)])
        self._loaded[key] = internal
        while len(self._loaded) > self._capacity:  # evict only once the new one is in
            (evicted, version), evicted_internal = self._loaded.popitem(last=False)
            self._pipeline.delete_adapters([evicted_internal])
            metrics.ADAPTER_EVICTIONS.labels(self._model_name).inc()
            log.info("adapter evicted", extra={"adapter": evicted, "version": version, "model": self._model_name})
        metrics.ADAPTER_LOADS.labels(self._model_name).inc()
        log.info("adapter loaded", extra={"adapter": name, "version": key[1], "model": self._model_name})
