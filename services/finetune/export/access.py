"""What the fine-tune API checks about exports, without torch: who may export, see, read and delete which one.

An export carries the name of the API key that asked for it. A key sees its own exports and those nobody owns
(an operator's); exporting needs an adapter the key sees, reading and listing an export the key sees, deleting
the owner or an admin (as for adapters).
"""

from __future__ import annotations

from services.finetune.export.checks import check_exportable, check_format, default_name
from services.finetune.export.store import ExportInfo, ExportStore, validate_export_name
from services.finetune.jobs import JobState, JobStore
from shared.adapters import AdapterStore, validate_adapter_name
from shared.auth import current_caller
from shared.errors import FailedPrecondition, InvalidArgument, NotFound


class ExportAccess:
    def __init__(self, adapters: AdapterStore, exports: ExportStore, jobs: JobStore):
        self.adapters, self.exports, self.jobs = adapters, exports, jobs

    def export_arguments(self, adapter: str, job_id: str, fmt: str, gguf_type: str, dtype: str, name: str) -> list[str]:
        """The export child's command line for a checked request; every refusal here says what to change."""
        adapter = self._adapter_of(adapter, job_id)
        info = self.adapters.get(adapter)
        if not current_caller().sees_shared(info.owner):
            raise NotFound(f"adapter {adapter!r} not found in the adapter store")
        check_exportable(info)
        gguf_type, dtype = gguf_type or "F16", dtype or "auto"
        check_format(fmt, gguf_type, dtype)
        name = validate_export_name(name) if name else default_name(adapter, fmt, gguf_type)
        self.exports.require_free(name)
        owner = current_caller().name
        return [adapter, "--format", fmt, "--gguf-type", gguf_type, "--dtype", dtype, "--owner", owner, "--name", name]

    def _adapter_of(self, adapter: str, job_id: str) -> str:
        if bool(adapter) == bool(job_id):
            raise InvalidArgument("set exactly one of adapter or job_id")
        if adapter:
            return validate_adapter_name(adapter)
        job = self.jobs.get(job_id)
        if not current_caller().sees(job.owner):
            raise NotFound(f"job {job_id!r} not found")
        if job.state != JobState.SUCCEEDED:
            raise FailedPrecondition(
                f"job {job_id!r} is {job.state.value}; only a succeeded job's adapter can be exported"
            )
        return job.adapter_name

    def get(self, name: str) -> ExportInfo:
        info = self.exports.get(name)
        if not current_caller().sees_shared(info.owner):
            raise NotFound(f"export {name!r} not found")
        return info

    def list(self) -> list[ExportInfo]:
        caller = current_caller()
        return [e for e in self.exports.list() if caller.sees_shared(e.owner)]

    def open_file(self, name: str, path: str):
        info = self.get(name)
        if not path:
            if info.format != "gguf":
                raise InvalidArgument(f"export {name!r} is a folder of {len(info.files)} files: name one as `path`")
            path = next(p for p in info.files if p.endswith(".gguf"))
        return self.exports.open_file(name, path)

    def delete(self, name: str) -> None:
        info = self.get(name)
        current_caller().require_owner(info.owner, f"export {name!r}")
        self.exports.delete(name)
