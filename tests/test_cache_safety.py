"""Caches that never delete what they did not write, and read-only caches (issue 16, items 1 and 5).

Eviction deletes only entries the teacher cache can prove it wrote (a folder named by the digest of its key.json,
holding only the cache's files); anything else in the cache folder is never deleted nor counted, and is warned about
once. Read-only caches are read where their files verify and skipped where they do not; nothing is written into them.
"""
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import kd.config  # noqa: F401  (registers the schema)
from kd import data, engine, fileio, teacher_cache
from kd.teacher_cache import EpochOutputs, TeacherCache
from support import read_only, tree_state
from support.folders import TRAIN_PER_CLASS, write_folder
from support.runs import compose_cfg

LOGITS = EpochOutputs(10, logits=torch.randn(100, 10, generator=torch.Generator().manual_seed(0)))


def cache(root: Path, name: str, max_bytes: float = 1e9) -> TeacherCache:
    return TeacherCache(root, {"teacher": name}, (100, 10), "float32", max_bytes=max_bytes)


def messages(caplog, *words: str) -> list[str]:
    """The warnings logged that hold every one of `words`."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and all(word in r.getMessage() for word in words)]


def foreign_content(root: Path, entry: TeacherCache) -> list[str]:
    """Write beside the cache's entries what it did not write, each of the names it must never delete."""
    (root / "my_results").mkdir()
    (root / "my_results" / "metrics.json").write_text('{"acc": 0.9}')
    (root / "notes.txt").write_text("mine")
    (root / "big.bin").write_bytes(bytes(10 ** 6))  # far over the bound: never counted, never a reason to evict
    forged = root / "0123456789abcdef"  # an entry's name, but its key.json hashes to another name
    forged.mkdir()
    shutil.copy(entry.dir / "key.json", forged / "key.json")
    shutil.copy(entry.dir / "epoch_0001.pt", forged / "epoch_0001.pt")
    shutil.copytree(entry.dir, root / entry.digest.upper())  # and one under a name that is not a digest
    nested = root / f"nested/{entry.digest}"  # a true entry below a user's folder
    nested.parent.mkdir()
    shutil.copytree(entry.dir, nested)
    linked = root / "linked"  # a link to a true entry elsewhere
    linked.symlink_to(entry.dir, target_is_directory=True)
    return ["0123456789abcdef", entry.digest.upper(), "big.bin", "linked", "my_results", "nested", "notes.txt"]


def test_eviction_never_removes_a_folder_it_did_not_create_even_over_the_bound(tmp_path, caplog):
    probe = cache(tmp_path / "probe", "probe")
    probe.save(1, LOGITS)
    bound = 2.5 * probe.size_bytes()  # room for two epochs and a half
    root = tmp_path / "cache"
    old = cache(root, "old", bound)
    old.save(1, LOGITS)
    old.save(2, LOGITS)  # a true entry of two epochs: the one to evict
    foreign = foreign_content(root, old)
    mixed = root / cache(root, "mixed").digest  # a true entry's name and key.json, plus a user's file
    shutil.copytree(old.dir, mixed)
    (mixed / "key.json").write_text(json.dumps(cache(root, "mixed").key, indent=2, sort_keys=True))
    (mixed / "mine.txt").write_text("not the cache's")
    foreign.append(mixed.name)
    outside = {k: v for k, v in tree_state(root).items() if k.split("/")[0] in foreign}
    for epoch in (1, 2):
        cache(root, "new", bound).save(epoch, LOGITS)  # over the bound: evicts
    assert not old.dir.exists()  # the only entry it could prove it wrote
    assert {k: v for k, v in tree_state(root).items() if k.split("/")[0] in foreign} == outside
    (warning,) = messages(caplog, "did not write")
    assert warning.startswith(f"teacher cache folder {root} holds {len(foreign)} item(s) the cache did not write (")
    assert "big.bin" in warning and "never deleted nor counted" in warning and "teacher_cache_dir" in warning


def test_foreign_content_is_not_counted_against_the_bound(tmp_path, caplog):
    probe = cache(tmp_path / "probe", "probe")
    probe.save(1, LOGITS)
    bound = 2.5 * probe.size_bytes()
    root = tmp_path / "cache"
    old = cache(root, "old", bound)
    old.save(1, LOGITS)
    (root / "my_results").mkdir()
    (root / "my_results" / "big.bin").write_bytes(bytes(10 ** 6))
    before = tree_state(root / "my_results")
    new = cache(root, "new", bound)
    new.save(1, LOGITS)  # two epochs of true entries: within the bound, though the folder holds 1 MB more
    assert old.dir.is_dir() and (old.dir / "epoch_0001.pt").is_file() and new.load(1) is not None
    assert tree_state(root / "my_results") == before and len(messages(caplog, "(my_results)")) == 1


def test_an_entry_whose_proof_fails_just_before_removal_is_left(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    old = cache(root, "old")
    old.save(1, LOGITS)
    (old.dir / "mine.txt").write_text("put there after the survey")
    before = tree_state(old.dir)
    assert not teacher_cache._remove_entry(old.dir)
    assert tree_state(old.dir) == before


def test_an_eviction_waits_for_another_jobs_write_and_leaves_no_half_entry(tmp_path, caplog, monkeypatch):
    """Two jobs share a cache folder; one evicts while the other is mid-write of the entry it evicts (a thread
    stands for the second job: the flock is per open file, so it excludes threads of one process as it does jobs)."""
    probe = cache(tmp_path / "probe", "probe")
    probe.save(1, LOGITS)
    root, bound = tmp_path / "cache", 2.5 * probe.size_bytes()
    writer, evictor = cache(root, "writer", bound), cache(root, "evictor", bound)
    writer.save(1, LOGITS)
    mid_write, real_save = threading.Event(), fileio.save_checkpoint

    def slow_save(path: Path, payload: dict) -> None:
        if path.parent == writer.dir:
            mid_write.set()
            time.sleep(0.5)  # the evictor tries now
        real_save(path, payload)

    monkeypatch.setattr(fileio, "save_checkpoint", slow_save)
    job = threading.Thread(target=writer.save, args=(2, LOGITS))
    job.start()
    assert mid_write.wait(10)
    evictor.save(1, LOGITS)  # 3 epochs over a bound of 2.5: deletes the writer's entry, once it is whole
    evictor.save(2, LOGITS)
    job.join()
    assert not writer.full and not messages(caplog, "could not store")  # the writer's epoch 2 landed
    assert not writer.dir.exists() and evictor.load(2) is not None  # then went whole: no half entry is left
    assert teacher_cache._survey(root) == ([evictor.dir], [])


def test_read_only_cache_folder_is_read_and_never_written(tmp_path, caplog):
    root = tmp_path / "cache"
    stored = cache(root, "stored")
    stored.save(1, LOGITS)
    (stored.dir / "epoch_0002.pt").write_bytes(b"damaged")
    before = tree_state(root)
    reader = cache(root, "stored")
    with read_only(root):
        assert torch.equal(reader.load(1).logits, LOGITS.logits)  # a hit: its recency is not recorded
        assert reader.load(2) is None and reader.load(3) is None  # damaged, then absent
        reader.save(2, LOGITS)
        reader.save(3, LOGITS)
    assert (reader.hits, reader.misses, reader.rejected) == (1, 2, 1)
    assert tree_state(root) == before
    (warning,) = messages(caplog, str(root))
    assert warning.startswith(f"teacher cache file {stored.dir / 'epoch_0002.pt'} rejected (unreadable")
    assert f"folder {root} cannot be written ([Errno 30] Read-only file system" in warning


def test_read_only_cache_without_the_epoch_warns_once_and_writes_nothing(tmp_path, caplog):
    root = tmp_path / "cache"
    cache(root, "other").save(1, LOGITS)
    before = tree_state(root)
    reader = cache(root, "missing")
    with read_only(root):
        for epoch in (1, 2):
            assert reader.load(epoch) is None
            reader.save(epoch, LOGITS)
    assert tree_state(root) == before
    (warning,) = messages(caplog, str(root))
    assert warning.startswith(f"could not store teacher outputs in {reader.dir} ([Errno 30] Read-only file system")


# ---------------------------------------------------------------------------------------------------------------
# whole runs over a read-only teacher cache


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> Path:
    """A teacher in its store and a cache filled by one student run (2 epochs); tests copy the cache."""
    tmp = tmp_path_factory.mktemp("filled")
    engine.run(compose_cfg(tmp, "phase=teacher", "epochs=2"), tmp / "teacher")
    engine.run(compose_cfg(tmp, "phase=student", "epochs=2", f"teacher_cache_dir={tmp / 'cache'}"), tmp / "writer")
    return tmp


def student_over(filled: Path, cache_root: Path, run: Path) -> tuple[dict, dict]:
    """A student run (the filled fixture's teacher) over cache_root: its result and run_info.json."""
    result = engine.run(compose_cfg(filled, "phase=student", "epochs=2", f"teacher_cache_dir={cache_root}"), run)
    return result, json.loads((run / "run_info.json").read_text())


def trained(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(("train/", "test/"))}


def test_run_over_a_read_only_teacher_cache_reads_its_entries(filled, tmp_path, caplog):
    root = tmp_path / "cache"
    shutil.copytree(filled / "cache", root)
    before = tree_state(root)
    with read_only(root):
        result, info = student_over(filled, root, tmp_path / "reader")
    assert (info["teacher_cache/hits"], info["teacher_cache/misses"]) == (2, 0)
    assert trained(result) == trained(json.loads((filled / "writer" / "result.json").read_text()))
    assert tree_state(root) == before and not messages(caplog, str(root))
    entries, foreign = teacher_cache._survey(root)  # the engine's key.json proves its entry (it could be evicted)
    assert [entry.name for entry in entries] == [info["teacher_cache/dir"].rsplit("/", 1)[1]] and foreign == []


def test_run_over_a_read_only_teacher_cache_with_a_damaged_entry_finishes(filled, tmp_path, caplog):
    root = tmp_path / "cache"
    shutil.copytree(filled / "cache", root)
    (damaged,) = root.glob("*/epoch_0001.pt")
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short
    before = tree_state(root)
    with read_only(root):
        result, info = student_over(filled, root, tmp_path / "reader")
    assert (info["teacher_cache/hits"], info["teacher_cache/misses"], info["teacher_cache/rejected"]) == (1, 1, 1)
    assert trained(result) == trained(json.loads((filled / "writer" / "result.json").read_text()))
    assert tree_state(root) == before
    (warning,) = messages(caplog, str(root))
    assert warning.startswith(f"teacher cache file {damaged} rejected (") and "skipped" in warning
    assert f"folder {root} cannot be written" in warning


# ---------------------------------------------------------------------------------------------------------------
# a read-only decode cache


def test_read_only_decode_cache_with_a_damaged_file_decodes_again(tmp_path, caplog):
    images, root = tmp_path / "images", tmp_path / "decode_cache"
    write_folder(images, seed=0)
    first = data.image_folder(str(images), 16, cache_dir=str(root))
    (stored,) = root.glob("*.pt")
    stored.write_bytes(stored.read_bytes()[:-100])  # cut short
    before = tree_state(root)
    caplog.set_level(logging.WARNING)
    with read_only(root):
        for _ in range(2):
            again = data.image_folder(str(images), 16, cache_dir=str(root))
            assert torch.equal(again.train.images, first.train.images) and len(again.train) == 2 * TRAIN_PER_CLASS
    assert tree_state(root) == before
    (warning,) = messages(caplog, str(root))
    assert warning.startswith(f"decode cache file {stored} is damaged (")
    assert f"Its folder {root} cannot be written ([Errno 30] Read-only file system" in warning
