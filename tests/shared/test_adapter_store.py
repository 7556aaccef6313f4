import json

import pytest

from shared.adapters import AdapterInfo, AdapterStore, validate_adapter_name
from shared.errors import AlreadyExists, InvalidArgument, NotFound


def write_dummy(folder):
    (folder / "adapter_config.json").write_text("{}")


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden", "x" * 65, "-lead", "trail-", "a..b", "spa ce"])
def test_names_that_could_escape_the_store_are_rejected(name):
    with pytest.raises(InvalidArgument, match="invalid adapter name"):
        validate_adapter_name(name)


@pytest.mark.parametrize("name", ["a", "my-adapter", "Chat_v2.1", "x" * 64])
def test_ordinary_names_are_accepted(name):
    assert validate_adapter_name(name) == name


def test_save_get_list_delete(tmp_path):
    store = AdapterStore(tmp_path / "adapters")
    assert store.list() == []
    store.save(AdapterInfo("b", "llm", "tiny-llm", job_id="j1", metrics={"train_loss": 0.5}), write_dummy)
    store.save(AdapterInfo("a", "diffusion", "tiny-sd"), write_dummy)
    info = store.get("b")
    assert (info.kind, info.base_model, info.job_id, info.metrics) == ("llm", "tiny-llm", "j1", {"train_loss": 0.5})
    assert info.created_at > 0
    assert [i.name for i in store.list()] == ["a", "b"]
    assert json.loads((store.path("b") / "modelworks.json").read_text())["base_model"] == "tiny-llm"
    store.delete("a")
    assert [i.name for i in store.list()] == ["b"]
    with pytest.raises(NotFound):
        store.get("a")


def test_duplicate_names_are_refused(tmp_path):
    store = AdapterStore(tmp_path)
    store.save(AdapterInfo("x", "llm", "m"), write_dummy)
    with pytest.raises(AlreadyExists):
        store.save(AdapterInfo("x", "llm", "m"), write_dummy)


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    store = AdapterStore(tmp_path)

    def crash(folder):
        write_dummy(folder)
        raise OSError("disk full")

    with pytest.raises(OSError):
        store.save(AdapterInfo("x", "llm", "m"), crash)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotFound):
        store.get("x")


def test_an_adapter_with_broken_metadata_does_not_break_the_listing(tmp_path):
    store = AdapterStore(tmp_path)
    store.save(AdapterInfo("good", "llm", "m"), write_dummy)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "modelworks.json").write_text("{not json")
    assert [a.name for a in store.list()] == ["good"]
