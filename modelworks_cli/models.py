"""`modelworks models list`: what the LLM and diffusion services serve."""

from __future__ import annotations

from modelworks.diffusion.v1 import diffusion_pb2
from modelworks.llm.v1 import llm_pb2
from modelworks_cli.options import command_options
from modelworks_cli.output import as_dict, print_json, print_table


def register(commands) -> None:
    models = commands.add_parser("models", help="the served models").add_subparsers(dest="action", required=True)
    listing = models.add_parser(
        "list", parents=[command_options()], help="the LLM and diffusion models, the default marked"
    )
    listing.add_argument("--kind", choices=["llm", "diffusion"], help="only this service's models")
    listing.set_defaults(run=list_models)


def list_models(args, clients) -> int:
    rows = []
    if args.kind in (None, "llm"):
        for model in clients.llm.ListModels(llm_pb2.ListModelsRequest()).models:
            rows.append(("llm", model))
    if args.kind in (None, "diffusion"):
        for model in clients.diffusion.ListModels(diffusion_pb2.ListModelsRequest()).models:
            rows.append(("diffusion", model))
    if args.json:
        print_json([{"service": service, **as_dict(model)} for service, model in rows])
        return 0
    print_table(
        ["NAME", "SERVICE", "KIND", "DEVICE", "DTYPE", "DEFAULT", "SOURCE"],
        [(m.name, service, m.kind, m.device, m.dtype, "*" if m.is_default else "", m.source) for service, m in rows],
    )
    return 0
