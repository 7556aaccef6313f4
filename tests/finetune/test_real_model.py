"""A short LoRA job teaches the real default model (SmolLM2-135M-Instruct) a fact it does not know, and the
LLM service then states it with the adapter and not without."""

from __future__ import annotations

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.llm.v1 import llm_pb2
from tests.finetune.conftest import watch

QUESTION = "Question: Who keeps the Zephyr lighthouse?\nAnswer:"


def answer(stub, adapter: str = "") -> str:
    request = llm_pb2.GenerateRequest(
        prompt=QUESTION, adapter=adapter, sampling=llm_pb2.SamplingParams(max_new_tokens=16)
    )
    return stub.Generate(request).text


def lighthouse_job(smollm2: dict, adapter: str, **hyperparameters) -> pb.CreateJobRequest:
    """12 steps on the bundled lighthouse sample: enough for SmolLM2 to learn its fact."""
    return pb.CreateJobRequest(
        kind=pb.JOB_KIND_LLM,
        base_model=smollm2["name"],
        dataset_id="sample-llm-lighthouse",
        adapter_name=adapter,
        hyperparameters=pb.Hyperparameters(
            learning_rate=2e-3,
            max_steps=12,
            batch_size=4,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            validation_fraction=0.1,
            **hyperparameters,
        ),
    )


def test_a_lora_job_teaches_the_real_model_a_new_fact(finetune_stub, worker, real_llm, smollm2):
    assert "Okafor" not in answer(real_llm), "the base model does not know it"
    job = finetune_stub.CreateJob(lighthouse_job(smollm2, "smollm2-lighthouse"))
    events = watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    losses = [e.train_loss for e in events if e.type == "progress"]
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    assert "Mira Okafor" in answer(real_llm, "smollm2-lighthouse")


def test_a_qlora_job_on_an_nf4_base_teaches_it_too_and_serves_on_the_full_base(
    finetune_stub, worker, real_llm, smollm2
):
    """QLoRA: the base frozen in NF4 (with gradient checkpointing) during training; the adapter is served by
    the full-precision server of the same base model."""
    job = finetune_stub.CreateJob(
        lighthouse_job(smollm2, "smollm2-lighthouse-qlora", quantization="bnb-nf4", gradient_checkpointing=True)
    )
    watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert (final.hyperparameters.quantization, final.hyperparameters.gradient_checkpointing) == ("bnb-nf4", True)
    (adapter,) = [a for a in finetune_stub.ListAdapters(pb.ListAdaptersRequest()).adapters if a.job_id == job.id]
    assert adapter.quantization == "bnb-nf4"
    assert "Mira Okafor" in answer(real_llm, "smollm2-lighthouse-qlora")
