"""Export a succeeded LLM job's adapter from the Fine-tune tab: merged into its base as GGUF (for llama.cpp and
Ollama) or as a Hugging Face folder, then offered as a download.

The fine-tune service writes the export (`ExportAdapter`); the gateway streams its bytes (`ReadExport`) into a
temporary file for the browser: the GGUF file itself, or a zip of the merged folder (stored, not compressed:
safetensors do not shrink). An export asked for again is downloaded again, not rewritten.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import gradio as gr
import grpc

from modelworks.finetune.v1 import finetune_pb2 as pb
from services.gateway.clients import QUICK_CALL_S, ServiceClients
from services.gateway.errors import user_errors

EXPORT_CALL_S = 3600.0  # merging a 7B model takes minutes; the service bounds it (finetune.export_timeout_s)
CHOICES = {
    "GGUF F16 (llama.cpp, Ollama)": (pb.EXPORT_FORMAT_GGUF, "F16"),
    "GGUF Q8_0 (half the size)": (pb.EXPORT_FORMAT_GGUF, "Q8_0"),
    "GGUF BF16": (pb.EXPORT_FORMAT_GGUF, "BF16"),
    "Merged model (safetensors, zip)": (pb.EXPORT_FORMAT_MERGED, ""),
}
DEFAULT_CHOICE = next(iter(CHOICES))


class Exporter:
    def __init__(self, clients: ServiceClients):
        self.clients = clients
        self.service = clients.finetune_service

    def export(self, finished: tuple | None, choice: str) -> tuple[str, str]:
        """(the file to download, a note) for the job shown; a `gr.Error` that says why not otherwise."""
        if not finished or finished[0] != "LLM":
            raise gr.Error("Pick a succeeded LLM job to export its adapter.", print_exception=False)
        if choice not in CHOICES:
            raise gr.Error(f"Choose an export format: {', '.join(CHOICES)}.", print_exception=False)
        fmt, gguf_type = CHOICES[choice]
        adapter = finished[2]
        export = self._written(adapter, fmt, gguf_type)
        path = self._download(export)
        size = export.total_bytes / 2**20
        return str(
            path
        ), f"Exported **{export.name}** ({size:,.1f} MiB) from adapter `{adapter}` on {export.base_model}."

    def _written(self, adapter: str, fmt: int, gguf_type: str) -> pb.Export:
        request = pb.ExportAdapterRequest(adapter=adapter, format=fmt, gguf_type=gguf_type)
        try:
            export = self.clients.finetune.ExportAdapter(request, timeout=EXPORT_CALL_S)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:  # asked for before: that export again
                earlier = self._existing(adapter, fmt, gguf_type)
                if earlier is not None:
                    return earlier
            with user_errors(self.service, "export_adapter"):
                raise
        return export

    def _existing(self, adapter: str, fmt: int, gguf_type: str) -> pb.Export | None:
        try:
            exports = self.clients.finetune.ListExports(pb.ListExportsRequest(), timeout=QUICK_CALL_S).exports
        except grpc.RpcError:
            return None
        return next((e for e in exports if e.adapter == adapter and e.format == fmt and e.gguf_type == gguf_type), None)

    def _download(self, export: pb.Export) -> Path:
        folder = Path(tempfile.mkdtemp(prefix="modelworks-export-"))
        with user_errors(self.service, "read_export"):
            if export.format == pb.EXPORT_FORMAT_GGUF:
                target = folder / f"{export.name}.gguf"
                self._fetch(export.name, "", target)
                return target
            target = folder / f"{export.name}.zip"
            with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED) as archive:
                for file in export.files:
                    part = folder / "part"
                    self._fetch(export.name, file.path, part)
                    archive.write(part, f"{export.name}/{file.path}")
                    part.unlink()
            return target

    def _fetch(self, name: str, path: str, target: Path) -> None:
        with target.open("wb") as out:
            for chunk in self.clients.finetune.ReadExport(pb.ReadExportRequest(name=name, path=path), timeout=600):
                out.write(chunk.chunk)
