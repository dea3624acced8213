"""State stores: round trips, integrity checks on disk, runs whose client states live on disk, and the auto store
(the default: memory until the projected client states pass AUTO_DISK_BYTES, then disk)."""
from __future__ import annotations

import pytest
import torch

import fedforge
from fedforge.core import store as store_module
from fedforge.core.store import AutoStore, DiskStore, MemoryStore, open_store, state_bytes, state_digest
from fedforge.errors import ConfigError, DataError, UnknownNameError


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "features.0.weight": torch.randn(4, 3, 2, 2, generator=g),
        "features.0.bias": torch.randn(4, generator=g),
        "control/head.weight": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
        "half": torch.randn(6, generator=g).half(),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["memory", "disk", "auto"])
def test_round_trip(kind, tmp_path):
    store = open_store(kind, tmp_path / "s" if kind == "disk" else None)
    st = sample_state()
    assert store.get(3) is None
    store.put(3, st)
    store.put(1, {})
    store.put(12, {"w": torch.ones(2)})
    assert store.cids() == [1, 3, 12] and len(store) == 3
    assert same(store.get(3), st)
    assert store.get(1) == {}
    store.put(3, {"w": torch.full((2,), 5.0)})  # overwrite
    assert torch.equal(store.get(3)["w"], torch.full((2,), 5.0))
    assert [c for c, _ in store.items()] == [1, 3, 12]
    store.close()


def test_disk_store_stores_views_and_shared_storage(tmp_path):
    base = torch.arange(12.0)
    st = {"a": base[:6], "b": base[6:], "t": torch.arange(6.0).view(2, 3).t()}  # shared storage, non-contiguous
    store = DiskStore(tmp_path)
    store.put(0, st)
    back = store.get(0)
    assert torch.equal(back["a"], base[:6]) and torch.equal(back["b"], base[6:]) and torch.equal(back["t"], st["t"])


def test_disk_store_holds_nothing_in_memory(tmp_path):
    store = DiskStore(tmp_path)
    for cid in range(5):
        store.put(cid, {"w": torch.full((1000,), float(cid))})
    assert not hasattr(store, "_d")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client-{c:07d}.safetensors" for c in range(5)]
    reopened = DiskStore(tmp_path, fresh=False)
    assert reopened.cids() == list(range(5))
    assert float(reopened.get(4)["w"][0]) == 4.0


def test_bit_flip_is_detected(tmp_path):
    store = DiskStore(tmp_path)
    store.put(2, sample_state())
    path = store.file(2)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x01  # one bit of the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="fails its checksum"):
        store.get(2)


def test_truncation_is_detected(tmp_path):
    store = DiskStore(tmp_path)
    store.put(2, sample_state())
    path = store.file(2)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt or truncated"):
        store.get(2)


def test_swapped_files_are_detected(tmp_path):
    store = DiskStore(tmp_path)
    store.put(1, {"w": torch.zeros(3)})
    store.put(2, {"w": torch.ones(3)})
    store.file(2).write_bytes(store.file(1).read_bytes())
    with pytest.raises(DataError, match="holds the state of client 1, not of client 2"):
        store.get(2)


def test_foreign_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    store = DiskStore(tmp_path)
    store.put(0, {"w": torch.zeros(3)})
    save_file({"w": torch.zeros(3)}, str(store.file(0)))  # a valid safetensors file without fedforge's checksum
    with pytest.raises(DataError, match="not a fedforge client-state file"):
        store.get(0)


def test_deleted_file_is_reported(tmp_path):
    store = DiskStore(tmp_path)
    store.put(0, {"w": torch.zeros(3)})
    store.file(0).unlink()
    with pytest.raises(DataError, match="disappeared"):
        store.get(0)


def test_digest_depends_on_names_dtypes_and_values():
    st = sample_state()
    d = state_digest(st)
    assert d == state_digest(dict(reversed(list(st.items()))))  # order-independent
    assert d != state_digest({**st, "features.0.bias": st["features.0.bias"] + 1e-7})
    assert d != state_digest({**st, "features.0.bias": st["features.0.bias"].double()})
    renamed = dict(st)
    renamed["features.0.bias2"] = renamed.pop("features.0.bias")
    assert d != state_digest(renamed)


def test_fresh_store_refuses_a_used_folder_and_clear_empties_it(tmp_path):
    DiskStore(tmp_path).put(5, {"w": torch.zeros(1)})
    with pytest.raises(ConfigError, match="already holds 1 client states"):
        DiskStore(tmp_path)
    cleared = open_store("disk", tmp_path, clear=True)
    assert cleared.cids() == [] and not list(tmp_path.glob("client-*"))


def test_temporary_folder_is_removed_on_close():
    store = DiskStore()
    store.put(0, {"w": torch.zeros(1)})
    path = store.path
    assert path.is_dir()
    store.close()
    assert not path.exists()


def test_unwritable_folder_and_unknown_kind(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the state folder"):
        DiskStore(blocker / "sub")
    with pytest.raises(UnknownNameError, match="memory, disk or auto"):
        open_store("dsk")
    assert isinstance(open_store("memory"), MemoryStore)


def test_config_rejects_an_unknown_store():
    with pytest.raises(ConfigError, match="state_store must be one of memory, disk, auto"):
        fedforge.build_config(overrides={"state_store": "cloud"})


def test_run_with_disk_state_matches_memory(tmp_path, monkeypatch):
    """`local` keeps a full model per client: the disk store, and the auto store on either side of its limit, must
    give the very same run as the memory store."""
    common = dict(algorithm="local", dataset="digits", clients=6, rounds=2, join_ratio=0.5, model="mlp", seed=3)
    mem = fedforge.run(run_dir=False, state_store="memory", **common)
    disk = fedforge.run(run_dir=tmp_path / "run", state_store="disk", **common)
    assert [r["personalized_acc"] for r in mem.records] == [r["personalized_acc"] for r in disk.records]
    files = sorted((tmp_path / "run" / "client_states").glob("client-*.safetensors"))
    assert len(files) == len(mem.store.cids()) > 0
    for cid, state in mem.store.items():
        assert same(state, disk.store.get(cid))
    auto_mem = fedforge.run(run_dir=False, **common)  # the default: auto, far below its limit
    one = state_bytes(mem.store.get(mem.store.cids()[0]))
    monkeypatch.setattr(store_module, "AUTO_DISK_BYTES", 6 * one - 1)  # 6 clients' states pass it: disk
    auto_disk = fedforge.run(run_dir=tmp_path / "auto", **common)
    assert isinstance(auto_mem.store, AutoStore) and auto_mem.store.kind == "memory"
    assert auto_disk.store.kind == "disk"
    assert len(list((tmp_path / "auto" / "client_states").glob("client-*.safetensors"))) == len(mem.store.cids())
    for res in (auto_mem, auto_disk):
        assert [r["personalized_acc"] for r in res.records] == [r["personalized_acc"] for r in mem.records]
        assert res.store.cids() == mem.store.cids()
        for cid, state in mem.store.items():
            assert same(state, res.store.get(cid))
    assert fedforge.build_config().state_store == "auto"
    assert "state_store" not in fedforge.build_config(overrides={"state_store": "disk"}).identity()


def test_auto_store_moves_every_state_to_disk_once_the_projection_passes_its_limit(tmp_path):
    state = sample_state()
    n = state_bytes(state)
    assert n == sum(t.numel() * t.element_size() for t in state.values())
    # 10 clients: the projection is 10 × the mean stored size, so one state of n bytes projects 10 n
    below = open_store("auto", tmp_path / "below", num_clients=10, limit=10 * n)
    for cid in range(10):
        below.put(cid, state)
    assert below.kind == "memory" and not (tmp_path / "below").exists()
    store = open_store("auto", tmp_path / "s", num_clients=10, limit=10 * n)
    store.put(3, state)
    assert store.kind == "memory"
    store.put(5, {**state, "extra": torch.ones(4)})  # the mean grows past n: 10 × mean > 10 n
    assert store.kind == "disk"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["client-0000003.safetensors", "client-0000005.safetensors"]
    store.put(7, state)  # later states go to disk too
    assert store.cids() == [3, 5, 7] and same(store.get(3), state) and same(store.get(7), state)
    assert list(store.get(5)) == [*state, "extra"]
    assert store.disk_bytes() > 3 * n
    store.close()


def test_run_with_explicit_state_dir(tmp_path):
    res = fedforge.run(algorithm="local", dataset="digits", clients=4, rounds=1, model="mlp", run_dir=False,
                       state_store="disk", state_dir=str(tmp_path / "states"))
    assert len(list((tmp_path / "states").glob("client-*.safetensors"))) == 4
    assert res.store.cids() == [0, 1, 2, 3]


@pytest.mark.parametrize("kind", ["memory", "disk", "auto"])
def test_state_keeps_its_key_order(kind, tmp_path):
    store = open_store(kind, tmp_path / "s" if kind == "disk" else None)
    names = ["z/weight", "a/bias", "m", "b.0.weight", "a/weight"]  # not sorted: safetensors itself sorts by name
    store.put(0, {k: torch.full((2,), float(i)) for i, k in enumerate(names)})
    got = store.get(0)
    assert list(got) == names
    assert [float(v[0]) for v in got.values()] == [0.0, 1.0, 2.0, 3.0, 4.0]
    store.close()
