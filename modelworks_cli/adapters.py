"""`modelworks adapters list|delete`: the LoRA adapters in the store, through the fine-tune service."""

from __future__ import annotations

from modelworks.finetune.v1 import finetune_pb2
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
                a.job_id or "-",
                timestamp(a.created_at),
            )
            for a in adapters
        ],
    )
    return 0


def delete_adapter(args, clients) -> int:
    clients.finetune.DeleteAdapter(finetune_pb2.DeleteAdapterRequest(name=args.name))
    if args.json:
        print_json({"deleted": args.name})
    else:
        print(f"deleted adapter {args.name}")
    return 0
