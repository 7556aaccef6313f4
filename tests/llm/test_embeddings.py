"""Embeddings through the real LLM service, on the built-in tiny encoder (random weights, real tokenizer)."""

from __future__ import annotations

import math
import re
import threading

import grpc
import pytest
import torch

from modelworks.llm.v1 import llm_pb2
from services.llm.embeddings import embed_batch
from shared.loaders import load_encoder

TEXTS = [
    "def parse(text):",
    "import os",
    "x",
    "class Loader:\n    def __init__(self):\n        pass",
    "é日本🎉 unicode",
]


def embed(stub, inputs, **fields) -> list[list[float]]:
    reply = stub.Embed(llm_pb2.EmbedRequest(inputs=inputs, **fields))
    assert reply.model == "tiny-embed"
    return [list(e.values) for e in reply.embeddings]


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def test_a_batch_equals_one_at_a_time_and_vectors_are_unit_length(llm_stub):
    together = embed(llm_stub, TEXTS)
    alone = [embed(llm_stub, [text])[0] for text in TEXTS]
    assert len(together) == len(TEXTS) and len(together[0]) == 64
    for a, b in zip(together, alone, strict=True):
        assert close(a, b)
        assert math.isclose(math.sqrt(sum(x * x for x in a)), 1.0, rel_tol=1e-5)
    assert len({tuple(v) for v in together}) == len(TEXTS)


def test_concurrent_calls_get_their_own_vectors(llm_stub):
    expected = {text: embed(llm_stub, [text])[0] for text in TEXTS}
    results: dict[int, list[list[float]]] = {}

    def call(i):
        results[i] = embed(llm_stub, TEXTS[i:] + TEXTS[:i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(TEXTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, vectors in results.items():
        for text, vector in zip(TEXTS[i:] + TEXTS[:i], vectors, strict=True):
            assert close(vector, expected[text])


def test_pooling_matches_the_encoders_own_hidden_states(llm_stub, settings):
    entry = next(m for m in settings.models if m.kind == "embedding")
    loaded = load_encoder(entry, settings)
    ids = loaded.tokenizer(TEXTS[0])["input_ids"]
    with torch.no_grad():
        hidden = loaded.model(torch.tensor([ids])).last_hidden_state[0]
    for pooling, expected in (
        (llm_pb2.POOLING_MEAN, hidden.mean(0)),
        (llm_pb2.POOLING_CLS, hidden[0]),
        (llm_pb2.POOLING_LAST, hidden[-1]),
    ):
        (got,) = embed(llm_stub, [TEXTS[0]], pooling=pooling, normalize=False)
        assert close(got, expected.tolist(), 1e-4), pooling
    assert embed_batch(loaded.model, [ids, ids[:2]], ["mean", "last"], 0).shape == (2, 64)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (llm_pb2.EmbedRequest(), "inputs is empty"),
        (llm_pb2.EmbedRequest(inputs=["a", ""]), r"inputs\[1\] is empty"),
        (llm_pb2.EmbedRequest(inputs=["x"] * 257), r"257 inputs; the limit is 256 \(llm.max_embed_inputs\)"),
        (llm_pb2.EmbedRequest(inputs=["word " * 600]), r"inputs\[0\] is \d+ tokens; this model embeds at most 512"),
        (llm_pb2.EmbedRequest(inputs=["a"], dimensions=16), "not trained to be truncated"),
        (llm_pb2.EmbedRequest(inputs=["a"], pooling=9), "pooling must be one of mean, last, cls"),
    ],
)
def test_bad_calls_are_refused_up_front(llm_stub, request_, message):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Embed(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, caught.value.details()), caught.value.details()


def test_an_llm_is_not_an_embedding_model(llm_stub):
    with pytest.raises(grpc.RpcError) as caught:
        llm_stub.Embed(llm_pb2.EmbedRequest(model="tiny-llm", inputs=["a"]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "served embedding models: tiny-embed" in caught.value.details()


def test_a_matryoshka_model_keeps_the_first_dimensions_then_normalizes(settings):
    from services.llm.served_embedder import ServedEmbedder
    from shared.settings import EmbeddingDefaults

    entry = next(m for m in settings.models if m.kind == "embedding")
    entry = entry.model_copy(update={"embedding": EmbeddingDefaults(matryoshka=True)})
    served = ServedEmbedder(load_encoder(entry, settings), settings.llm)
    served.start()
    try:
        raw = served.new_job(TEXTS[:2], "", False, 0)
        short = served.new_job(TEXTS[:2], "", True, 16)
        served.engine.submit(raw)
        served.engine.submit(short)
        full, cut = raw.done.result(60), short.done.result(60)
        assert cut.shape == (2, 16)
        assert torch.allclose(cut, torch.nn.functional.normalize(full[:, :16], dim=-1), atol=1e-6)
        with pytest.raises(Exception, match="at most 64"):
            served.new_job(["a"], "", True, 65)
    finally:
        served.shutdown()
