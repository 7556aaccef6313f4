"""`modelworks chat` and `modelworks generate`: text from the LLM service, streamed as it is generated."""

from __future__ import annotations

import sys

import grpc

from modelworks.llm.v1 import llm_pb2
from modelworks_cli.connection import CliError, report_rpc_error
from modelworks_cli.options import command_options, count, seed_number
from modelworks_cli.output import as_dict, print_json

EXIT_WORDS = {"/exit", "/quit", "exit", "quit"}


def add_generation_options(parser) -> None:
    parser.add_argument("--model", default="", help="a model from `models list` (default: the service's default)")
    parser.add_argument("--adapter", default="", help="a LoRA adapter from `adapters list`")
    parser.add_argument("--max-tokens", type=count, default=0, help="most new tokens (default: the service's)")
    parser.add_argument("--min-tokens", type=count, default=0, help="no end of text before this many tokens")
    parser.add_argument("--temperature", type=float, default=None, help="0 is greedy (default: the service's)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]")
    parser.add_argument("--top-k", type=count, default=0, help="sample from the k likeliest tokens (0: off)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--seed", type=seed_number, default=None, help="same seed, same request: same output")
    parser.add_argument("--stop", action="append", default=[], help="end before this text (repeatable)")


def register(commands) -> None:
    chat = commands.add_parser(
        "chat",
        parents=[command_options()],
        help="chat with a model (interactive without a message)",
        description="Send MESSAGE and stream the reply. Without MESSAGE: an interactive chat on a terminal "
        "(history kept, /exit or Ctrl-D to leave), or the message read from standard input.",
    )
    chat.add_argument("message", nargs="?", help="the user message")
    chat.add_argument("--system", default="", help="a system prompt")
    add_generation_options(chat)
    chat.set_defaults(run=chat_command)

    generate = commands.add_parser(
        "generate", parents=[command_options()], help="complete a raw prompt (no chat template)"
    )
    generate.add_argument("prompt", nargs="?", help="the prompt (default: read from standard input)")
    add_generation_options(generate)
    generate.set_defaults(run=generate_command)


def sampling(args) -> llm_pb2.SamplingParams:
    params = llm_pb2.SamplingParams(
        max_new_tokens=args.max_tokens, min_new_tokens=args.min_tokens, top_k=args.top_k, stop=args.stop
    )
    for name in ("temperature", "top_p", "repetition_penalty", "seed"):  # unset: the service's default
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    return params


def request(args, **content) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(model=args.model, adapter=args.adapter, sampling=sampling(args), **content)


def stream(clients, req: llm_pb2.GenerateRequest) -> str:
    """Print the reply as it arrives; returns it whole."""
    parts = []
    for chunk in clients.llm.GenerateStream(req):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        parts.append(chunk.text)
    sys.stdout.write("\n")
    return "".join(parts)


def respond(args, clients, req: llm_pb2.GenerateRequest) -> None:
    """One reply: streamed text, or with --json the whole response at once."""
    if args.json:
        print_json(as_dict(clients.llm.Generate(req)))
    else:
        stream(clients, req)


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CliError(f"standard input is not UTF-8 text (byte {error.start}): pass the text itself", 2) from None


def generate_command(args, clients) -> int:
    prompt = args.prompt if args.prompt is not None else read_stdin()
    respond(args, clients, request(args, prompt=prompt))
    return 0


def chat_command(args, clients) -> int:
    history = [llm_pb2.ChatMessage(role="system", content=args.system)] if args.system else []
    if args.message is not None:
        message = args.message
    elif sys.stdin.isatty():
        return interactive(args, clients, history)
    else:
        message = read_stdin()
    history.append(llm_pb2.ChatMessage(role="user", content=message))
    respond(args, clients, request(args, messages=history))
    return 0


def interactive(args, clients, history: list) -> int:
    """A conversation on the terminal: each reply joins the history the next message is sent with."""
    print("Chatting (/exit or Ctrl-D to leave).", file=sys.stderr)
    while True:
        try:
            message = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if message.strip() in EXIT_WORDS:
            return 0
        if not message.strip():
            continue
        history.append(llm_pb2.ChatMessage(role="user", content=message))
        sys.stdout.write("model> ")
        try:
            reply = stream(clients, request(args, messages=history))
        except grpc.RpcError as error:  # say why and keep the conversation: the next message may do
            print(file=sys.stdout)
            report_rpc_error(error, clients)
            history.pop()
            continue
        history.append(llm_pb2.ChatMessage(role="assistant", content=reply))
