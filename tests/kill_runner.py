"""train.py that SIGKILLs itself at a chosen point, so tests can prove that a killed run resumes exactly and leaves
nothing half-written that a later run could read.

    KD_KILL_AT=step:E:S        python tests/kill_runner.py <train.py arguments>  # before step S of epoch E
    KD_KILL_AT=before:NAME:N   ...   # right before the N-th write of a file whose name matches NAME (fnmatch)
    KD_KILL_AT=write:NAME:N    ...   # during that write: half its bytes are in the temporary file
    KD_KILL_AT=after:NAME:N    ...   # right after that write landed
    KD_KILL_AT=decode:N        ...   # while decoding the N-th image of an image folder
    KD_KILL_AT=pause:E:S KD_PAUSE_DIR=D ...  # before step S of epoch E: touch D/paused, wait for D/resume

E counts the training epochs this process runs, and N the writes (fileio.atomic_write_bytes, which every record,
checkpoint and cache file goes through) or
decoded images, across the runs of a process (a student training its teacher on demand, the jobs of a multirun).
The hooks live here, not in kd/, so production code carries no test switches.
"""
import fnmatch
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kd.data  # noqa: E402
import kd.fileio  # noqa: E402
import kd.loop  # noqa: E402

kind, *spec = os.environ["KD_KILL_AT"].split(":")
counts = {"epochs": 0, "writes": 0, "images": 0}


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counting_epoch(job, epoch: int, _real=kd.loop.train_one_epoch):
    counts["epochs"] += 1
    return _real(job, epoch)


def killing_step(job, context, batch, _real=kd.loop.train_step):
    if kind in ("step", "pause") and (counts["epochs"], context.step) == tuple(map(int, spec)):
        pause() if kind == "pause" else die()
    return _real(job, context, batch)


def pause() -> None:
    """Hold the run here (its folder lock held) until the test lets it go on."""
    folder = Path(os.environ["KD_PAUSE_DIR"])
    (folder / "paused").touch()
    while not (folder / "resume").exists():
        time.sleep(0.05)


def killing_read_image(path, image_size, _real=kd.data.read_image):
    counts["images"] += 1
    if kind == "decode" and counts["images"] == int(spec[0]):
        die()
    return _real(path, image_size)


def write_hook(path: Path, data, write) -> None:
    """Count writes of matching files and die before, during or after the chosen one."""
    chosen = kind in ("before", "write", "after") and fnmatch.fnmatch(Path(path).name, spec[0])
    if chosen:
        counts["writes"] += 1
        chosen = counts["writes"] == int(spec[1])
    if chosen and kind == "before":
        die()
    if chosen and kind == "write":  # what a kill mid-write leaves: a partial temporary file beside the target
        fd, _ = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
        content = data()
        os.write(fd, content[: len(content) // 2])
        os.fsync(fd)
        die()
    write()
    if chosen and kind == "after":
        die()


def killing_atomic_write(path: Path, data: bytes, _real=kd.fileio.atomic_write_bytes) -> None:
    write_hook(path, lambda: data, lambda: _real(path, data))


kd.loop.train_one_epoch = counting_epoch
kd.loop.train_step = killing_step
kd.data.read_image = killing_read_image
kd.fileio.atomic_write_bytes = killing_atomic_write

if __name__ == "__main__":
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")  # as a script, so Hydra finds conf/ beside it
