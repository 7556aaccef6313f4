"""Client channel options shared by the services' gRPC clients (the web app and the OpenAI API)."""

from __future__ import annotations

# Every address a name resolves to gets calls in turn: `dns:///llm:50051` (or plain `llm:50051`) in compose
# resolves to every replica of `docker compose up --scale llm=N`, and gRPC re-resolves when one goes away.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.lb_policy_name", "round_robin"),
]
