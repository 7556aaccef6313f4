"""`modelworks datasets upload|list`: training data for fine-tune jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from modelworks.finetune.v1 import finetune_pb2
from modelworks_cli.connection import CliError
from modelworks_cli.options import command_options
from modelworks_cli.output import print_json, print_table, timestamp

FORMATS = {".jsonl": "jsonl", ".zip": "imagefolder_zip"}
# Under the fine-tune service's smallest allowed message (finetune.max_message_bytes, at least 1 KiB, 8 MiB
# by default) with room for framing; big files simply take more messages.
CHUNK_BYTES = 512 * 1024


def register(commands) -> None:
    datasets = commands.add_parser("datasets", help="training datasets").add_subparsers(dest="action", required=True)
    upload = datasets.add_parser(
        "upload", parents=[command_options()], help="upload a JSONL (LLM) or an image-folder zip (diffusion)"
    )
    upload.add_argument("path", type=Path)
    upload.add_argument("--name", default="", help="a label (default: the file's name)")
    upload.add_argument("--format", choices=sorted(FORMATS.values()), help="default: from the file's extension")
    upload.set_defaults(run=upload_dataset)
    listing = datasets.add_parser("list", parents=[command_options()], help="your datasets and the bundled samples")
    listing.set_defaults(run=list_datasets)


def dataset_format(path: Path, given: str | None) -> str:
    if given:
        return given
    if path.suffix.lower() in FORMATS:
        return FORMATS[path.suffix.lower()]
    raise CliError(f"cannot tell {path.name}'s format from its extension: pass --format jsonl or imagefolder_zip", 2)


def upload_messages(path: Path, info: finetune_pb2.DatasetInfo) -> Iterator[finetune_pb2.UploadDatasetRequest]:
    yield finetune_pb2.UploadDatasetRequest(info=info)
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            yield finetune_pb2.UploadDatasetRequest(chunk=chunk)


def upload_dataset(args, clients) -> int:
    if not args.path.is_file():
        raise CliError(f"no such file: {args.path}", 2)
    info = finetune_pb2.DatasetInfo(name=args.name or args.path.stem, format=dataset_format(args.path, args.format))
    dataset = clients.finetune.UploadDataset(upload_messages(args.path, info))
    if args.json:
        print_json(dataset)
    else:
        print(f"uploaded {dataset.id}: {dataset.num_records} {dataset.record_type} records ({dataset.name})")
    return 0


def list_datasets(args, clients) -> int:
    datasets = clients.finetune.ListDatasets(finetune_pb2.ListDatasetsRequest()).datasets
    if args.json:
        print_json(list(datasets))
        return 0
    print_table(
        ["ID", "NAME", "FORMAT", "RECORDS", "TYPE", "CREATED"],
        [
            (d.id, d.name, d.format, d.num_records, d.record_type, "bundled" if d.bundled else timestamp(d.created_at))
            for d in datasets
        ],
    )
    return 0
