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


def test_a_lora_job_teaches_the_real_model_a_new_fact(finetune_stub, worker, real_llm, smollm2):
    assert "Okafor" not in answer(real_llm), "the base model does not know it"
    job = finetune_stub.CreateJob(
        pb.CreateJobRequest(
            kind=pb.JOB_KIND_LLM,
            base_model=smollm2["name"],
            dataset_id="sample-llm-lighthouse",
            adapter_name="smollm2-lighthouse",
            hyperparameters=pb.Hyperparameters(
                learning_rate=2e-3,
                max_steps=12,
                batch_size=4,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                validation_fraction=0.1,
            ),
        )
    )
    events = watch(finetune_stub, job.id)
    final = finetune_stub.GetJob(pb.GetJobRequest(id=job.id))
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    losses = [e.train_loss for e in events if e.type == "progress"]
    assert losses[-1] < losses[0] / 5, (losses[0], losses[-1])
    assert "Mira Okafor" in answer(real_llm, "smollm2-lighthouse")
