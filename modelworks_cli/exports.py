"""`modelworks exports create|list|download|delete`: adapters merged into their base, as GGUF or safetensors."""

from __future__ import annotations

from pathlib import Path

from modelworks.finetune.v1 import finetune_pb2
from modelworks_cli.connection import CliError
from modelworks_cli.options import command_options
from modelworks_cli.output import print_json, print_table, timestamp

FORMATS = {"gguf": finetune_pb2.EXPORT_FORMAT_GGUF, "merged": finetune_pb2.EXPORT_FORMAT_MERGED}
EXPORT_TIMEOUT_S = 3600.0  # merging a 7B model takes minutes; the service bounds it (finetune.export_timeout_s)


def register(commands) -> None:
    exports = commands.add_parser("exports", help="adapters exported merged or as GGUF")
    actions = exports.add_subparsers(dest="action", required=True)
    create = actions.add_parser(
        "create", parents=[command_options()], help="merge an LLM adapter into its base and write it out"
    )
    create.add_argument("adapter", nargs="?", default="", help="the adapter's name (or --job)")
    create.add_argument("--job", default="", help="a succeeded job, whose adapter is exported")
    create.add_argument("--format", choices=sorted(FORMATS), default="gguf", help="default gguf")
    create.add_argument("--gguf-type", choices=("F16", "BF16", "Q8_0"), default="", help="GGUF: default F16")
    create.add_argument("--dtype", default="", help="merged: auto (the base's), float32, bfloat16 or float16")
    create.add_argument("--name", default="", help="default: <adapter>-merged or <adapter>-<gguf type>")
    create.add_argument("--download", type=Path, metavar="DIR", help="then download it into this folder")
    create.set_defaults(run=create_export)
    listing = actions.add_parser("list", parents=[command_options()], help="the exports you can download")
    listing.set_defaults(run=list_exports)
    download = actions.add_parser("download", parents=[command_options()], help="download an export's files")
    download.add_argument("name")
    download.add_argument("--to", type=Path, default=Path("."), metavar="DIR", help="default: this folder")
    download.set_defaults(run=download_export)
    delete = actions.add_parser("delete", parents=[command_options()], help="delete an export (owner or admin)")
    delete.add_argument("name")
    delete.set_defaults(run=delete_export)


def create_export(args, clients) -> int:
    request = finetune_pb2.ExportAdapterRequest(
        adapter=args.adapter, job_id=args.job, format=FORMATS[args.format], gguf_type=args.gguf_type,
        dtype=args.dtype, name=args.name,
    )  # fmt: skip
    export = clients.finetune.ExportAdapter(request, timeout=EXPORT_TIMEOUT_S)
    if args.json:
        print_json(export)
    else:
        print(f"exported {export.name}: {len(export.files)} files, {export.total_bytes / 2**20:,.1f} MiB")
    if args.download:
        fetch(clients, export, args.download, quiet=args.json)
    return 0


def list_exports(args, clients) -> int:
    exports = clients.finetune.ListExports(finetune_pb2.ListExportsRequest()).exports
    if args.json:
        print_json(list(exports))
        return 0
    print_table(
        ["NAME", "FORMAT", "ADAPTER", "BASE MODEL", "SIZE", "CREATED"],
        [
            (
                e.name,
                f"gguf {e.gguf_type}" if e.format == finetune_pb2.EXPORT_FORMAT_GGUF else f"merged {e.dtype}",
                e.adapter,
                e.base_model,
                f"{e.total_bytes / 2**20:,.1f} MiB",
                timestamp(e.created_at),
            )
            for e in exports
        ],
    )
    return 0


def download_export(args, clients) -> int:
    exports = {e.name: e for e in clients.finetune.ListExports(finetune_pb2.ListExportsRequest()).exports}
    if args.name not in exports:
        raise CliError(f"no export named {args.name!r}; `modelworks exports list` shows them", 2)
    fetch(clients, exports[args.name], args.to, quiet=args.json)
    return 0


def fetch(clients, export, folder: Path, quiet: bool) -> None:
    """Each file of `export` into `folder` (a merged export into `folder/<name>/`), written whole or not at all."""
    root = folder if export.format == finetune_pb2.EXPORT_FORMAT_GGUF else folder / export.name
    for file in export.files:
        target = root / file.path
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        request = finetune_pb2.ReadExportRequest(name=export.name, path=file.path)
        with partial.open("wb") as out:
            for chunk in clients.finetune.ReadExport(request):
                out.write(chunk.chunk)
        partial.replace(target)
        if not quiet:
            print(f"wrote {target}")


def delete_export(args, clients) -> int:
    clients.finetune.DeleteExport(finetune_pb2.DeleteExportRequest(name=args.name))
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted export {args.name}")
    return 0
