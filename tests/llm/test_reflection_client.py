"""A client that knows only the contract it discovers through server reflection (as grpcurl does)."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "modelworks.llm.v1.LLMService"


class ReflectedService:
    def __init__(self, channel: grpc.Channel, service: str):
        self.pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        self.service = self.pool.FindServiceByName(service)
        self.channel = channel

    def message(self, full_name: str, **fields):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))(**fields)

    def call(self, method_name: str, request):
        method = self.service.methods_by_name[method_name]
        reply_class = message_factory.GetMessageClass(method.output_type)
        path = f"/{self.service.full_name}/{method_name}"
        if method.server_streaming:
            return self.channel.unary_stream(path, lambda m: m.SerializeToString(), reply_class.FromString)(request)
        return self.channel.unary_unary(path, lambda m: m.SerializeToString(), reply_class.FromString)(request)


def test_reflection_lists_the_service(llm_server):
    with grpc.insecure_channel(llm_server.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert {SERVICE, "grpc.health.v1.Health"} <= set(services)


def test_a_reflection_only_client_can_use_every_rpc(llm_server):
    with grpc.insecure_channel(llm_server.address) as channel:
        llm = ReflectedService(channel, SERVICE)
        assert set(llm.service.methods_by_name) >= {"Generate", "GenerateStream", "Tokenize", "ListModels"}

        models = llm.call("ListModels", llm.message("modelworks.llm.v1.ListModelsRequest")).models
        assert [m.name for m in models] == ["tiny-llm", "tiny-embed"]

        sampling = llm.message("modelworks.llm.v1.SamplingParams", max_new_tokens=8, temperature=0.7, seed=11)
        req = llm.message("modelworks.llm.v1.GenerateRequest", prompt="Hello", sampling=sampling)
        reply = llm.call("Generate", req)
        assert reply.usage.completion_tokens >= 1
        streamed = "".join(chunk.text for chunk in llm.call("GenerateStream", req))
        assert streamed == reply.text

        ids = llm.call("Tokenize", llm.message("modelworks.llm.v1.TokenizeRequest", text="Hello")).ids
        assert len(ids) >= 2

        bad = llm.message(
            "modelworks.llm.v1.GenerateRequest",
            prompt="x",
            sampling=llm.message("modelworks.llm.v1.SamplingParams", temperature=-1),
        )
        try:
            llm.call("Generate", bad)
            raise AssertionError("negative temperature was accepted")
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
