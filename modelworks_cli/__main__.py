"""`modelworks` (or `python -m modelworks_cli`): parse the command line, run one command, exit with its status."""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from modelworks_cli import adapters, chat, datasets, exports, images, jobs, models, status
from modelworks_cli.connection import SERVICE_TITLES, Clients, CliError, report_rpc_error
from modelworks_cli.options import add_global_options

COMMAND_GROUPS = (models, status, chat, images, adapters, exports, datasets, jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modelworks",
        description="Chat, generate images and fine-tune adapters on a running ModelWorks stack (`make run`).",
    )
    add_global_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = {service: getattr(args, f"{service}_target") for service in SERVICE_TITLES}
    clients = Clients(targets, api_key=args.api_key)
    try:
        return args.run(args, clients)
    except grpc.RpcError as error:
        return report_rpc_error(error, clients)
    except CliError as error:
        print(f"modelworks: {error}", file=sys.stderr)
        return error.status
    except BrokenPipeError:  # `modelworks ... | head`: the reader left; stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        print(f"modelworks: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    finally:
        clients.close()


if __name__ == "__main__":
    sys.exit(main())
