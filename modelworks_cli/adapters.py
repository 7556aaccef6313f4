"""`modelworks adapters list|import|delete`: the LoRA adapters in the store, through the fine-tune service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from modelworks.finetune.v1 import finetune_pb2
from modelworks_cli.connection import CliError
from modelworks_cli.datasets import CHUNK_BYTES
from modelworks_cli.options import command_options
from modelworks_cli.output import enum_name, print_json, print_table, timestamp

KINDS = {"llm": finetune_pb2.JOB_KIND_LLM, "diffusion": finetune_pb2.JOB_KIND_DIFFUSION}


def register(commands) -> None:
    group = commands.add_parser("adapters", help="trained LoRA adapters")
    adapters = group.add_subparsers(dest="action", required=True)
    listing = adapters.add_parser(
        "list", parents=[command_options()], help="the adapters the LLM and diffusion services can serve"
    )
    listing.add_argument("--kind", choices=sorted(KINDS), help="only LLM or only diffusion adapters")
    listing.set_defaults(run=list_adapters)
    imported = adapters.add_parser(
        "import", parents=[command_options()],
        help="import a diffusion LoRA file (.safetensors: diffusers, Kohya/A1111 as Civitai serves them, or Flux)",
    )  # fmt: skip
    imported.add_argument("path", type=Path)
    imported.add_argument("--name", required=True, help="the name it is served by")
    imported.add_argument("--base-model", required=True, help="the diffusion model it was made for")
    imported.set_defaults(run=import_adapter)
    delete = adapters.add_parser(
        "delete", parents=[command_options()], help="delete an adapter (its owner's key or an admin key)"
    )
    delete.add_argument("name")
    delete.set_defaults(run=delete_adapter)


def list_adapters(args, clients) -> int:
    kind = KINDS.get(args.kind, finetune_pb2.JOB_KIND_UNSPECIFIED)
    adapters = clients.finetune.ListAdapters(finetune_pb2.ListAdaptersRequest(kind=kind)).adapters
    if args.json:
        print_json(list(adapters))
        return 0
    print_table(
        ["NAME", "KIND", "BASE MODEL", "METHOD", "JOB", "CREATED"],
        [
            (
                a.name,
                enum_name(finetune_pb2.JobKind.Name(a.kind), "JOB_KIND_"),
                a.base_model,
                a.method,
                a.job_id or (f"imported ({a.imported_format})" if a.imported_format else "-"),
                timestamp(a.created_at),
            )
            for a in adapters
        ],
    )
    return 0


def import_messages(path: Path, name: str, base_model: str) -> Iterator[finetune_pb2.ImportAdapterRequest]:
    yield finetune_pb2.ImportAdapterRequest(info=finetune_pb2.ImportAdapterInfo(name=name, base_model=base_model))
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield finetune_pb2.ImportAdapterRequest(chunk=chunk)


def import_adapter(args, clients) -> int:
    if not args.path.is_file():
        raise CliError(f"no such file: {args.path}", 2)
    adapter = clients.finetune.ImportAdapter(import_messages(args.path, args.name, args.base_model))
    if args.json:
        print_json(adapter)
    else:
        print(f"imported {adapter.name} ({adapter.imported_format} LoRA for {adapter.base_model})")
    return 0


def delete_adapter(args, clients) -> int:
    clients.finetune.DeleteAdapter(finetune_pb2.DeleteAdapterRequest(name=args.name))
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted adapter {args.name}")
    return 0
