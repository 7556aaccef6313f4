"""Model registry: which models a service serves, by name, and where their weights come from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.errors import InvalidArgument, NotFound
from shared.settings import ModelEntry, ModelKind

SourceKind = Literal["hf", "local", "builtin", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    ref: str  # a hub repo id, a directory, a built-in name, or a GGUF file (gguf: sources)
    revision: str | None = None


def parse_source(source: str) -> ModelSource:
    """`hf:<repo id>[@revision]`, `builtin:<name>`, `gguf:<file>` / `gguf:package:<package>/<file>`, or a path
    to a local Hugging Face folder."""
    if source.startswith("hf:"):
        repo, _, revision = source[3:].partition("@")
        if not repo or repo.count("/") > 1:
            raise InvalidArgument(f"bad source {source!r}: expected hf:<owner>/<name>[@revision]")
        return ModelSource("hf", repo, revision or None)
    if source.startswith("builtin:"):
        return ModelSource("builtin", source[len("builtin:") :])
    if source.startswith("gguf:"):
        if not source[len("gguf:") :]:
            raise InvalidArgument(f"bad source {source!r}: expected gguf:<file> or gguf:package:<package>/<file>")
        return ModelSource("gguf", source[len("gguf:") :])
    if not source:
        raise InvalidArgument("a model source is empty")
    return ModelSource("local", str(Path(source).expanduser()))


class ModelRegistry:
    """The configured models of one kind; the first is the default for requests that name none."""

    def __init__(self, entries: list[ModelEntry], kind: ModelKind):
        self.kind = kind
        self._entries = {e.name: e for e in entries if e.kind == kind}
        for entry in self._entries.values():
            parse_source(entry.source)  # fail at start-up, not at the first request

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def default_name(self) -> str | None:
        return next(iter(self._entries), None)

    def entries(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get(self, name: str) -> ModelEntry:
        if not name:
            if self.default_name is None:
                raise NotFound(f"no {self.kind} model is configured")
            name = self.default_name
        try:
            return self._entries[name]
        except KeyError:
            raise NotFound(f"unknown model {name!r}; served {self.kind} models: {', '.join(self.names)}") from None
