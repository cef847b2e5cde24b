"""Helpers shared by the test modules (import as `from support import ...`: pytest puts tests/ on sys.path)."""
import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
from pathlib import Path


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under root, by relative path: a file's sha256 and mode, a folder's mode, a link's target.
    Equal before and after an action means it deleted, changed and half-wrote nothing there."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[key] = f"dir {path.stat().st_mode:o}"
            elif not path.is_file():  # a pipe or a device: reading it could block
                state[key] = f"special {path.stat().st_mode:o}"
            else:
                state[key] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
    return state


def wandb_segments(run_dir: Path) -> list[Path]:
    """The .wandb files of a run folder's offline W&B run, oldest first: one per process that logged to it."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda path: path.parent.name)


def wandb_records(path: Path) -> list:
    """Parse an offline run's .wandb file (a LevelDB-style log of protobuf records in 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2  # here: only the tests that read W&B files pay for the import

    data, pos, chunks, out = Path(path).read_bytes(), 7, [], []  # 7-byte file header: ":W&B", magic, version
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            out.append(wandb_internal_pb2.Record.FromString(b"".join(chunks)))
            chunks = []
    return out


def wandb_history(path: Path) -> list[dict]:
    """The rows an offline run's .wandb file logged (run.log), each with its `_step`."""
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in wandb_records(path) if r.HasField("history")]


# ---------------------------------------------------------------------------------------------------------------
# read-only folders, also for root (the tests run as root on some machines, where chmod does not stop a write)

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _resolved(path, dir_fd=None) -> Path:
    path = Path(os.fsdecode(path))
    if dir_fd is not None and not path.is_absolute():
        path = Path(os.readlink(f"/proc/self/fd/{dir_fd}")) / path
    return Path(os.path.abspath(path))


@contextlib.contextmanager
def read_only(*folders: Path):
    """Within the block, every write, creation, deletion, rename, chmod or utime under `folders` fails with
    OSError(EROFS) naming the path, as on a read-only mount; reads work. Patches the os and builtins entry points
    that pathlib, tempfile and shutil go through (not torch.save to a path, whose C++ writer opens the file itself:
    kd.fileio.save_checkpoint writes through atomic_write_bytes, which is covered)."""
    roots = [Path(os.path.abspath(f)) for f in folders]
    saved = {}

    def guarded(path, dir_fd=None) -> None:
        target = _resolved(path, dir_fd)
        if any(target == root or root in target.parents for root in roots):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))

    def wrap(module, name, writes=lambda *a, **k: True, paths=(0,)):
        original = getattr(module, name)
        saved[(module, name)] = original

        def patched(*args, **kwargs):
            if writes(*args, **kwargs):
                for i in paths:
                    if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)):
                        guarded(args[i], kwargs.get("dir_fd", kwargs.get("src_dir_fd" if i == 0 else "dst_dir_fd")))
            return original(*args, **kwargs)

        setattr(module, name, patched)

    def opens_for_writing(file, mode="r", *args, **kwargs) -> bool:
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def os_open_writes(path, flags, *args, **kwargs) -> bool:
        return bool(flags & _WRITE_FLAGS)

    try:
        wrap(builtins, "open", opens_for_writing)
        wrap(io, "open", opens_for_writing)
        wrap(os, "open", os_open_writes)
        for name in ("mkdir", "unlink", "remove", "rmdir", "utime", "chmod", "truncate", "symlink", "link"):
            wrap(os, name, paths=(0, 1) if name in ("symlink", "link") else (0,))
        for name in ("rename", "replace"):
            wrap(os, name, paths=(0, 1))
        yield
    finally:
        for (module, name), original in saved.items():
            setattr(module, name, original)
