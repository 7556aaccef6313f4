"""Checkpoints under leases, in process: each attempt writes its own folder, resumes from the last earlier
attempt that left one, and writes or prunes nothing once its lease is gone. (With real workers, a paused
worker waking after another resumed its job: `test_recovery`.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from services.finetune.training import checkpoint
from services.finetune.training.checkpoint import LeaseLost, LoopState


class Parts:
    """A model, optimizer and scheduler small enough to checkpoint in milliseconds."""

    def __init__(self, seed: int = 0):
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(4, 2)
        self.optimizer = torch.optim.AdamW(self.model.parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)

    def save(self, job_dir: Path, attempt: int, step: int, still_holds_lease=lambda: True) -> Path:
        state = LoopState(step=step)
        return checkpoint.save(
            job_dir, attempt, self.model, self.optimizer, self.scheduler, None, state, None, still_holds_lease
        )

    def restore(self, job_dir: Path, attempt: int):
        return checkpoint.restore_latest(job_dir, attempt, self.model, self.optimizer, self.scheduler, None)


def files(job_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(job_dir)) for p in job_dir.rglob("*"))


def steps_of(job_dir: Path, attempt: int) -> list[str]:
    return sorted(p.name for p in checkpoint.attempt_folder(job_dir, attempt).glob("step-*"))


def test_an_attempt_resumes_from_the_last_earlier_attempt_never_from_a_later_one(tmp_path):
    parts = Parts()
    parts.save(tmp_path, 1, 10)
    parts.save(tmp_path, 1, 20)
    parts.save(tmp_path, 3, 50)  # a later attempt's: another worker's now
    state, _ = Parts(seed=1).restore(tmp_path, 2)
    assert state.step == 20
    assert Parts().restore(tmp_path / "nothing", 1) is None


def test_an_attempt_prunes_its_own_old_checkpoints_and_earlier_attempts_never_a_later_one(tmp_path):
    parts = Parts()
    parts.save(tmp_path, 1, 10)
    parts.save(tmp_path, 1, 20)
    parts.save(tmp_path, 3, 50)
    parts.save(tmp_path, 2, 30)
    assert steps_of(tmp_path, 1) == ["step-10", "step-20"], "kept until attempt 2 has two of its own"
    parts.save(tmp_path, 2, 40)
    parts.save(tmp_path, 2, 45)
    assert not checkpoint.attempt_folder(tmp_path, 1).exists()
    assert steps_of(tmp_path, 2) == ["step-40", "step-45"]
    assert steps_of(tmp_path, 3) == ["step-50"], "a later attempt's checkpoints are not this attempt's to prune"


def test_a_save_without_the_lease_writes_nothing_and_prunes_nothing(tmp_path):
    parts = Parts()
    parts.save(tmp_path, 2, 10)
    parts.save(tmp_path, 2, 20)
    before = files(tmp_path)
    with pytest.raises(LeaseLost):
        parts.save(tmp_path, 2, 30, still_holds_lease=lambda: False)
    assert files(tmp_path) == before


def test_a_lease_lost_while_writing_leaves_the_older_checkpoints_in_place(tmp_path):
    parts = Parts()
    parts.save(tmp_path, 1, 10)
    parts.save(tmp_path, 1, 20)
    answers = iter([True, False])  # held when the write began, gone when it ended
    with pytest.raises(LeaseLost):
        parts.save(tmp_path, 1, 30, still_holds_lease=lambda: next(answers))
    assert steps_of(tmp_path, 1) == ["step-10", "step-20", "step-30"], "nothing pruned without the lease"


def test_removing_a_jobs_checkpoints_keeps_its_other_files(tmp_path):
    Parts().save(tmp_path, 1, 10)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("kept")
    checkpoint.remove_all(tmp_path)
    assert files(tmp_path) == ["tensorboard", "tensorboard/events"]


def test_a_failed_job_keeps_no_checkpoints_but_keeps_its_tensorboard_events(redis_server, tmp_path):
    """Real Redis, the real attempt: a job whose dataset is gone fails, and an earlier attempt's
    checkpoints go with it (nothing will resume it)."""
    import redis

    from services.finetune.jobs import JobRecord, JobStore
    from services.finetune.runner import WorkerContext, run_job
    from shared.settings import Settings

    settings = Settings.model_validate({"data_dir": str(tmp_path), "redis_url": redis_server.url})
    store = JobStore(redis.Redis.from_url(redis_server.url), prefix=f"test-{tmp_path.name}")
    job = store.create(
        JobRecord(
            id=store.new_id(),
            kind="llm",
            base_model="tiny-llm",
            dataset_id="ds-0123456789abcdef",
            adapter_name="never-published",
            hyperparameters={},
            total_steps=10,
            attempt=2,
        )
    )
    job_dir = settings.jobs_dir / job.id
    Parts().save(job_dir, 1, 5)  # what attempt 1 left
    context = WorkerContext(settings, store, "in-process", enqueue=lambda job_id, attempt: None)
    assert run_job(job.id, 2, context) == "failed"
    assert store.get(job.id).state == "failed"
    assert not (job_dir / checkpoint.CHECKPOINTS).exists()
    assert (job_dir / "tensorboard").is_dir()


def test_a_job_checkpointed_before_per_attempt_folders_resumes_from_them_and_prunes_only_them(tmp_path):
    """An older release wrote `checkpoint-<k>/` and `latest` in the job's folder: a job running across the
    upgrade resumes from there, and its new attempt's pruning removes those, nothing else of the job's."""
    parts = Parts()
    saved = parts.save(tmp_path, 1, 10)
    saved.rename(tmp_path / "checkpoint-10")  # the older release's layout
    (tmp_path / checkpoint.LATEST).write_text("checkpoint-10")
    shutil.rmtree(tmp_path / checkpoint.CHECKPOINTS)
    (tmp_path / "tensorboard").mkdir()
    state, _ = Parts(seed=1).restore(tmp_path, 1)
    assert state.step == 10
    parts.save(tmp_path, 1, 20)
    assert (tmp_path / "checkpoint-10").is_dir(), "kept until the attempt has two of its own"
    parts.save(tmp_path, 1, 30)
    assert not (tmp_path / "checkpoint-10").exists() and not (tmp_path / checkpoint.LATEST).exists()
    assert steps_of(tmp_path, 1) == ["step-20", "step-30"] and (tmp_path / "tensorboard").is_dir()
    (tmp_path / "checkpoint-7").mkdir()
    checkpoint.remove_all(tmp_path)  # the job ended: both layouts go, its TensorBoard events stay
    assert files(tmp_path) == ["tensorboard"]
