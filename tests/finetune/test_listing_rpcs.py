"""GetDataset, ReadDataset and ListJobEvents (what OpenAI's Files and fine-tuning events endpoints need),
through a real server with named keys: what each key sees, bytes as uploaded, events newest first by page.

Jobs here go to a queue no worker consumes and are cancelled at once; their events beyond `queued` and
`cancelled` are written straight into the job's stream, so every count below is known exactly. The last
test trains a real job and pages through the events its worker wrote.
"""

from __future__ import annotations

import functools
import json

import grpc
import pytest
import redis

from modelworks.finetune.v1 import finetune_pb2 as pb
from modelworks.finetune.v1 import finetune_pb2_grpc
from services.finetune.jobs import EVENT_TYPES, JobEvent, JobStore
from services.finetune.samples import LLM_SAMPLE_ID, llm_sample_jsonl
from services.finetune.servicer import READ_CHUNK_BYTES, read_chunk_bytes
from tests.finetune.conftest import job_request, spawn_two_key_server, watch
from tests.finetune.test_limits import as_key, refused

SYNTHETIC_EVENTS = 1200  # more than one 500-event batch of a filtered scan
CHECKPOINT_EVERY = 100
EVAL_EVERY = 50


@pytest.fixture(scope="module")
def listing_server(data_dir, smollm2, redis_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune-listing")
    server = spawn_two_key_server(data_dir, redis_server.url, workdir, queue="listing-no-worker")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stub(listing_server):
    with grpc.insecure_channel(listing_server.address) as channel:
        yield finetune_pb2_grpc.FineTuneServiceStub(channel)


@pytest.fixture(scope="module")
def store(redis_server) -> JobStore:
    """The API's own job store (the default prefix), to write events into a job's stream."""
    return JobStore(redis.Redis.from_url(redis_server.url))


def upload_as(stub, key: str, name: str, data: bytes, chunk: int = 256 * 1024) -> pb.Dataset:
    def messages():
        yield pb.UploadDatasetRequest(info=pb.DatasetInfo(name=name, format="jsonl"))
        for start in range(0, len(data), chunk):
            yield pb.UploadDatasetRequest(chunk=data[start : start + chunk])

    return stub.UploadDataset(messages(), metadata=as_key(key))


def jsonl_of_size(min_bytes: int) -> bytes:
    line = json.dumps({"prompt": "q" * 500, "completion": "a" * 500}).encode() + b"\n"
    return line * (min_bytes // len(line) + 1)


def read(stub, key: str, dataset_id: str) -> list[bytes]:
    return [m.chunk for m in stub.ReadDataset(pb.ReadDatasetRequest(id=dataset_id), metadata=as_key(key))]


def events(stub, job_id: str, key: str = "alice", **request) -> pb.ListJobEventsResponse:
    return stub.ListJobEvents(pb.ListJobEventsRequest(id=job_id, **request), metadata=as_key(key))


def all_pages(stub, job_id: str, key: str = "alice", **request) -> list[pb.ListJobEventsResponse]:
    """Every page, each one's `before` the last event id of the one before; bounded, so a bug cannot loop."""
    pages, before = [], ""
    for _ in range(SYNTHETIC_EVENTS + 10):
        pages.append(events(stub, job_id, key, before=before, **request))
        if not pages[-1].has_more:
            return pages
        before = pages[-1].events[-1].event_id
    raise AssertionError("ListJobEvents kept answering has_more")


def synthetic_event(i: int) -> JobEvent:
    kind = "checkpoint" if i % CHECKPOINT_EVERY == 0 else "eval" if i % EVAL_EVERY == 0 else "progress"
    return JobEvent(kind, state="running", step=i, total_steps=SYNTHETIC_EVENTS, message=f"event {i}")


@pytest.fixture(scope="module")
def alices_job(stub, store) -> pb.Job:
    """Alice's cancelled job with `queued`, `cancelled`, then SYNTHETIC_EVENTS events (steps 1..N) stored."""
    job = stub.CreateJob(job_request("llm", "lora", "listing-events", max_steps=100_000), metadata=as_key("alice"))
    stub.CancelJob(pb.CancelJobRequest(id=job.id), metadata=as_key("alice"))
    pipe = store.redis.pipeline()
    for i in range(1, SYNTHETIC_EVENTS + 1):
        pipe.xadd(store.events_key(job.id), synthetic_event(i).to_fields())
    pipe.execute()
    return job


def stored_newest_first(store: JobStore, job_id: str) -> list[str]:
    return [e.id for e in reversed(list(store.all_events(job_id)))]


# -- GetDataset and ReadDataset -------------------------------------------------------------------------------


def test_a_dataset_is_got_by_its_owner_and_samples_by_anyone(stub):
    dataset = upload_as(stub, "alice", "alice-get", jsonl_of_size(1))
    try:
        assert stub.GetDataset(pb.GetDatasetRequest(id=dataset.id), metadata=as_key("alice")) == dataset
        sample = stub.GetDataset(pb.GetDatasetRequest(id=LLM_SAMPLE_ID), metadata=as_key("bob"))
        assert (sample.bundled, sample.owner, sample.num_records) == (True, "", 40)
        for key, dataset_id in (("bob", dataset.id), ("alice", "ds-0123456789abcdef"), ("alice", "../x")):
            error = refused(stub.GetDataset, pb.GetDatasetRequest(id=dataset_id), metadata=as_key(key))
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
            assert f"dataset {dataset_id!r} not found" in error.details()
    finally:
        stub.DeleteDataset(pb.DeleteDatasetRequest(id=dataset.id), metadata=as_key("alice"))


def test_a_dataset_reads_back_exactly_as_uploaded_in_chunks(stub):
    data = jsonl_of_size(2 * READ_CHUNK_BYTES + READ_CHUNK_BYTES // 2)
    dataset = upload_as(stub, "alice", "alice-read", data)
    try:
        chunks = read(stub, "alice", dataset.id)
        assert [len(c) for c in chunks] == [READ_CHUNK_BYTES, READ_CHUNK_BYTES, len(data) - 2 * READ_CHUNK_BYTES]
        assert b"".join(chunks) == data and dataset.size_bytes == len(data)
        assert b"".join(read(stub, "bob", LLM_SAMPLE_ID)) == llm_sample_jsonl()  # samples: everyone's
        for key, dataset_id in (("bob", dataset.id), ("alice", "ds-0123456789abcdef"), ("alice", "")):
            error = refused(stub.ReadDataset, pb.ReadDatasetRequest(id=dataset_id), metadata=as_key(key))
            assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    finally:
        stub.DeleteDataset(pb.DeleteDatasetRequest(id=dataset.id), metadata=as_key("alice"))


def test_a_read_chunk_fits_in_the_largest_message():
    assert read_chunk_bytes(8 * 1024 * 1024) == READ_CHUNK_BYTES
    assert 0 < read_chunk_bytes(1024) < 1024  # the smallest finetune.max_message_bytes allowed


# -- ListJobEvents --------------------------------------------------------------------------------------------


def test_events_are_newest_first_twenty_by_default(stub, store, alices_job):
    page = events(stub, alices_job.id)
    assert [e.step for e in page.events] == list(range(SYNTHETIC_EVENTS, SYNTHETIC_EVENTS - 20, -1))
    assert page.has_more and all(e.job_id == alices_job.id for e in page.events)
    assert [e.event_id for e in page.events] == stored_newest_first(store, alices_job.id)[:20]
    assert page.events[0].message == f"event {SYNTHETIC_EVENTS}" and page.events[0].state == pb.JOB_STATE_RUNNING


def test_pages_cover_every_event_once_newest_first(stub, store, alices_job):
    pages = all_pages(stub, alices_job.id, limit=7)
    listed = [e.event_id for page in pages for e in page.events]
    assert listed == stored_newest_first(store, alices_job.id)  # exactly once each, in order
    assert len(listed) == SYNTHETIC_EVENTS + 2
    assert [len(p.events) for p in pages] == [7] * (len(listed) // 7) + [len(listed) % 7]
    assert [e.type for e in pages[-1].events][-2:] == ["state", "state"]  # cancelled, then the first: queued
    assert pages[-1].events[-1].state == pb.JOB_STATE_QUEUED


def test_has_more_says_whether_older_events_remain(stub, alices_job):
    first = events(stub, alices_job.id, limit=1000)  # the largest page
    assert len(first.events) == 1000 and first.has_more
    rest = events(stub, alices_job.id, limit=1000, before=first.events[-1].event_id)
    assert len(rest.events) == SYNTHETIC_EVENTS + 2 - 1000 and not rest.has_more
    last_two = rest.events[-3].event_id
    exact = events(stub, alices_job.id, limit=2, before=last_two)  # exactly the two left: nothing after them
    assert [e.type for e in exact.events] == ["state", "state"] and not exact.has_more
    assert events(stub, alices_job.id, limit=1, before=last_two).has_more
    oldest = exact.events[-1].event_id
    assert events(stub, alices_job.id, before=oldest) == pb.ListJobEventsResponse()  # nothing older
    assert events(stub, alices_job.id, before="0-0") == pb.ListJobEventsResponse()


@pytest.mark.parametrize("event_type", ["checkpoint", "eval", "state"])
def test_the_type_filter_pages_through_one_type(stub, store, alices_job, event_type):
    expected = [e.id for e in reversed(list(store.all_events(alices_job.id))) if e.type == event_type]
    pages = all_pages(stub, alices_job.id, limit=5, type=event_type)
    assert [e.event_id for page in pages for e in page.events] == expected
    assert all(e.type == event_type for page in pages for e in page.events)
    assert [p.has_more for p in pages] == [True] * (len(pages) - 1) + [False]
    checkpoints = SYNTHETIC_EVENTS // CHECKPOINT_EVERY
    counts = {"checkpoint": checkpoints, "eval": SYNTHETIC_EVENTS // EVAL_EVERY - checkpoints, "state": 2}
    assert len(expected) == counts[event_type]
    assert events(stub, alices_job.id, type="warning") == pb.ListJobEventsResponse()  # none of that type


BAD_EVENT_REQUESTS = {
    "a page over 1000": (dict(limit=1001), grpc.StatusCode.INVALID_ARGUMENT, "limit must be at most 1000, got 1001"),
    "an unknown type": (dict(type="metrics"), grpc.StatusCode.INVALID_ARGUMENT, ", ".join(EVENT_TYPES)),
    "a malformed cursor": (dict(before="latest"), grpc.StatusCode.INVALID_ARGUMENT, "'latest' is not an event_id"),
    "a cursor past 64 bits": (dict(before=f"{2**64}-0"), grpc.StatusCode.INVALID_ARGUMENT, "is not an event_id"),
}


@pytest.mark.parametrize("case", list(BAD_EVENT_REQUESTS))
def test_bad_event_requests_are_invalid(stub, alices_job, case):
    request, code, message = BAD_EVENT_REQUESTS[case]
    error = refused(stub.ListJobEvents, pb.ListJobEventsRequest(id=alices_job.id, **request), metadata=as_key("alice"))
    assert error.code() == code and message in error.details(), error.details()


def test_another_keys_or_an_unknown_jobs_events_are_not_found(stub, alices_job):
    for key, job_id in (("bob", alices_job.id), ("alice", "ftjob-0123456789abcdef"), ("alice", "ftjob-0000")):
        error = refused(stub.ListJobEvents, pb.ListJobEventsRequest(id=job_id), metadata=as_key(key))
        assert error.code() == grpc.StatusCode.NOT_FOUND and job_id in error.details(), error.details()


def test_a_trained_jobs_events_list_as_watch_replays_them_reversed(finetune_stub, worker):
    job = finetune_stub.CreateJob(
        job_request("llm", "lora", "listing-trained", max_steps=6, save_steps=2, eval_steps=3)
    )
    watched = watch(finetune_stub, job.id)
    assert watched[-1].state == pb.JOB_STATE_SUCCEEDED, watched[-1].message
    pages, before = [], ""
    while not pages or pages[-1].has_more:
        pages.append(finetune_stub.ListJobEvents(pb.ListJobEventsRequest(id=job.id, limit=4, before=before)))
        before = pages[-1].events[-1].event_id if pages[-1].events else ""
        assert len(pages) <= len(watched), "more pages than events"
    assert [e for page in pages for e in page.events] == list(reversed(watched))
    for event_type in ("checkpoint", "eval", "progress"):
        listed = finetune_stub.ListJobEvents(pb.ListJobEventsRequest(id=job.id, limit=1000, type=event_type))
        expected = [e for e in reversed(watched) if e.type == event_type]
        assert expected and list(listed.events) == expected and not listed.has_more, event_type
    finetune_stub.DeleteAdapter(pb.DeleteAdapterRequest(name="listing-trained"))


def test_fuzzed_listing_calls_never_answer_internal(stub, alices_job):
    """A cursor Redis would refuse must be INVALID_ARGUMENT here, not a Redis error answered INTERNAL."""
    from tests.fuzzing import FuzzTarget, fuzz

    newest = events(stub, alices_job.id, limit=1).events[0].event_id
    likely = {
        "id": [alices_job.id, LLM_SAMPLE_ID, "ftjob-0123456789abcdef", "ds-0123456789abcdef", ""],
        "before": [newest, "0-0", "0-1", f"{2**64 - 1}-{2**64 - 1}", "1-", "-1-0", "1.5-0", ""],
        "type": [*EVENT_TYPES, ""],
    }
    for name, request_class, streaming in (
        ("GetDataset", pb.GetDatasetRequest, False),
        ("ReadDataset", pb.ReadDatasetRequest, True),
        ("ListJobEvents", pb.ListJobEventsRequest, False),
    ):
        call = functools.partial(getattr(stub, name), metadata=as_key("alice"))
        report = fuzz(FuzzTarget(name, request_class, call, streaming, likely), 40, derandomize=True)
        assert report.examples >= 10, report
