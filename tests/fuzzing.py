"""Property-based fuzzing of a service's request messages, built from their protobuf descriptors.

Every field of every request message gets values from a strategy of its type, mixed with the values
that break servers (empty, huge, negative-as-unsigned, NaN, infinities, paths, unknown enum numbers,
truncated images). The property: whatever the request, the server answers with a status a client can
act on — never INTERNAL or UNKNOWN — within the deadline (no hang), and stays healthy.

Shared by `tests/test_fuzz.py` (a bounded, derandomized count in `make test`) and `bench/fuzz.py` (a
larger, random run in `make bench`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
CALL_DEADLINE_S = 60.0

UINT32_EDGES = [0, 1, 2, 3, 4, 7, 8, 16, 63, 64, 999, 1000, 4096, 2**31 - 1, 2**31, 2**32 - 1]
UINT64_EDGES = [*UINT32_EDGES, 2**63 - 1, 2**63, 2**64 - 1]
FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-39, 1e-5, 0.01, 7.5, 100.0, 101.0, 1e30, -1e30]


def small_png(width: int = 16, height: int = 16) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _strings(known: list[str]) -> st.SearchStrategy[str]:
    edges = ["", " ", "../x", "a/b", "..", "\x00", "é日本🎉", "x" * 300, "lora-a", *known]
    return st.one_of(st.sampled_from(edges), st.text(max_size=40))


def _bytes() -> st.SearchStrategy[bytes]:
    png = small_png()
    return st.one_of(
        st.sampled_from([b"", b"not an image", png, png[: len(png) // 2], small_png(8, 200)]),
        st.binary(max_size=64),
    )


def _floats() -> st.SearchStrategy[float]:
    return st.one_of(
        st.sampled_from(FLOAT_EDGES),
        st.floats(width=32, allow_nan=True, allow_infinity=True),
    )


def _scalar(field: FieldDescriptor, likely: dict[str, list[str]]) -> st.SearchStrategy:
    """Values of a field's type; string fields named in `likely` mostly get those (valid) values, since a
    random model or adapter name is refused before anything deeper is looked at."""
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        known = [v for values in likely.values() for v in values]
        if field.name in likely:
            valid = st.sampled_from(likely[field.name])
            return st.one_of(valid, valid, valid, _strings(known))
        return _strings(known)
    if t == FieldDescriptor.TYPE_BYTES:
        return _bytes()
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return _floats()
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32):
        return st.integers(-(2**31), 2**31 - 1)
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    if t == FieldDescriptor.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.integers(-5, 50))  # unknown numbers too
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def message_strategy(descriptor: Descriptor, likely: dict[str, list[str]], depth: int = 0) -> st.SearchStrategy[dict]:
    """Field dicts for `descriptor`: each field present or absent, of its type, nested messages included."""
    fields = {}
    for field in descriptor.fields:
        if _is_map(field):
            key, value = (field.message_type.fields_by_name[n] for n in ("key", "value"))
            fields[field.name] = st.dictionaries(_scalar(key, likely), _scalar(value, likely), max_size=3)
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            value = message_strategy(field.message_type, likely, depth + 1) if depth < 3 else st.just({})
        else:
            value = _scalar(field, likely)
        if field.is_repeated:
            value = st.lists(value, max_size=3)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields)


def _is_map(field: FieldDescriptor) -> bool:
    return field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry


def build(message_class, values: dict):
    """A message from a field dict (nested dicts become messages)."""
    message = message_class()
    _fill(message, values)
    return message


def _fill(message, values: dict) -> None:
    for name, value in values.items():
        field = message.DESCRIPTOR.fields_by_name[name]
        if _is_map(field):
            getattr(message, name).update(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.is_repeated:
                for item in value:
                    _fill(getattr(message, name).add(), item)
            else:
                getattr(message, name).SetInParent()
                _fill(getattr(message, name), value)
        elif field.is_repeated:
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)


@dataclass
class FuzzTarget:
    """One RPC: how to call it and with what request message."""

    name: str
    request_class: type
    call: Callable  # a stub method
    streaming: bool
    likely: dict[str, list[str]]  # mostly-valid values for string fields, by field name


@dataclass
class FuzzReport:
    examples: int = 0
    by_code: dict[str, int] | None = None


def fuzz(target: FuzzTarget, examples: int, derandomize: bool) -> FuzzReport:
    """Send `examples` generated requests; raise AssertionError on INTERNAL/UNKNOWN or a hang."""
    report = FuzzReport(by_code={})
    strategy = message_strategy(target.request_class.DESCRIPTOR, target.likely)

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(strategy)
    def one_request(values: dict) -> None:
        request = build(target.request_class, values)
        code = _status_of(target, request)
        report.examples += 1
        report.by_code[code.name] = report.by_code.get(code.name, 0) + 1
        assert code in ACCEPTABLE, f"{target.name} answered {code.name} to {request}"

    one_request()
    return report


def _status_of(target: FuzzTarget, request) -> grpc.StatusCode:
    try:
        if target.streaming:
            for _ in target.call(request, timeout=CALL_DEADLINE_S):
                pass
        else:
            target.call(request, timeout=CALL_DEADLINE_S)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


LLM_LIKELY = {
    "model": ["", "tiny-llm"],
    "adapter": ["", "", "lora-a", "lora-b"],
    "role": ["user", "assistant", "system"],
    "json_schema": ['{"type": "object"}', '{"type": "string", "maxLength": 5}', '{"enum": ["a", "b"]}'],
    "regex": ["[ab]{1,3}", "x|y"],
    "grammar": ['root ::= "a" | "b"'],
}
EMBED_LIKELY = {"model": ["", "tiny-embed", "tiny-llm"], "inputs": ["hello", "def f(x):", "é日本🎉"]}
DIFFUSION_LIKELY = {
    "model": [
        "",
        "tiny-sd",
        "tiny-sdxl",
        "tiny-sd3",
        "tiny-flux",
        "tiny-controlnet-sd",
        "tiny-controlnet-sdxl",
        "tiny-controlnet-flux",
    ],
    "preprocess": ["", "canny"],
    "adapter": ["", "", "style-a"],
    "scheduler": [
        "",
        "DDIM",
        "Euler a",
        "DPM++ 2M Karras",
        "PNDM",
        "LCM",
        "Heun",
        "UniPC",
        "Euler Karras",
        "Euler Beta",
    ],
}


def fuzz_targets(llm_channel: grpc.Channel | None, diffusion_channel: grpc.Channel | None) -> list[FuzzTarget]:
    """Every RPC of the LLM and diffusion services (the listing calls have empty requests)."""
    targets = []
    if llm_channel is not None:
        from modelworks.llm.v1 import llm_pb2 as llm
        from modelworks.llm.v1 import llm_pb2_grpc

        stub = llm_pb2_grpc.LLMServiceStub(llm_channel)
        targets += [
            FuzzTarget("LLM Generate", llm.GenerateRequest, stub.Generate, False, LLM_LIKELY),
            FuzzTarget("LLM GenerateStream", llm.GenerateRequest, stub.GenerateStream, True, LLM_LIKELY),
            FuzzTarget("LLM Tokenize", llm.TokenizeRequest, stub.Tokenize, False, LLM_LIKELY),
            FuzzTarget("LLM ListModels", llm.ListModelsRequest, stub.ListModels, False, LLM_LIKELY),
            FuzzTarget("LLM Embed", llm.EmbedRequest, stub.Embed, False, EMBED_LIKELY),
        ]
    if diffusion_channel is not None:
        from modelworks.diffusion.v1 import diffusion_pb2 as diffusion
        from modelworks.diffusion.v1 import diffusion_pb2_grpc

        stub = diffusion_pb2_grpc.DiffusionServiceStub(diffusion_channel)
        targets += [
            FuzzTarget(
                "Diffusion GenerateImages",
                diffusion.GenerateImagesRequest,
                stub.GenerateImages,
                False,
                DIFFUSION_LIKELY,
            ),
            FuzzTarget(
                "Diffusion GenerateImagesStream",
                diffusion.GenerateImagesRequest,
                stub.GenerateImagesStream,
                True,
                DIFFUSION_LIKELY,
            ),
            FuzzTarget("Diffusion ListModels", diffusion.ListModelsRequest, stub.ListModels, False, DIFFUSION_LIKELY),
            FuzzTarget(
                "Diffusion ListSchedulers",
                diffusion.ListSchedulersRequest,
                stub.ListSchedulers,
                False,
                DIFFUSION_LIKELY,
            ),
        ]
    return targets


# Limits that keep every valid fuzzed request cheap: the property is about validation and isolation,
# not throughput, so a valid request should cost milliseconds.
FUZZ_SERVER_ENV = {
    "MODELWORKS_LLM__MAX_NEW_TOKENS_LIMIT": "16",
    "MODELWORKS_LLM__DEFAULT_MAX_NEW_TOKENS": "8",
    "MODELWORKS_LLM__MAX_PROMPT_CHARS": "4000",
    "MODELWORKS_DIFFUSION__MAX_WIDTH": "64",
    "MODELWORKS_DIFFUSION__MAX_HEIGHT": "64",
    "MODELWORKS_DIFFUSION__MAX_STEPS": "8",
    "MODELWORKS_DIFFUSION__MAX_NUM_IMAGES": "2",
    "MODELWORKS_DIFFUSION__MAX_BATCH_IMAGES": "2",
}
