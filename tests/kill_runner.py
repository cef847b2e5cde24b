"""train.py that SIGKILLs itself at a chosen point, so tests can prove a killed run resumes exactly.

    KD_KILL_AT=E:S        python tests/kill_runner.py <train.py arguments>   # before training step S of epoch E
    KD_KILL_AT=E:ckpt     ...                                                # right after the E-th last.pt lands
    KD_KILL_AT=E:pre-ckpt ...                                                # right before the E-th last.pt write

E counts the training epochs (and last.pt writes) of this process, across the jobs of a multirun. The hook
lives here, not in kd/, so production code carries no test switches.
"""
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kd.engine  # noqa: E402
import kd.records  # noqa: E402

epoch_text, point = os.environ["KD_KILL_AT"].split(":")
target = int(epoch_text)
counts = {"epochs": 0, "checkpoints": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def counting_generator(seed: int, epoch: int, _real=kd.engine.epoch_generator):
    counts["epochs"] += 1
    return _real(seed, epoch)


def killing_batches(split, batch_size, generator=None, _real=kd.engine.batches):
    for step, batch in enumerate(_real(split, batch_size, generator)):
        if generator is not None and point.isdigit() and (counts["epochs"], step) == (target, int(point)):
            die()
        yield batch


def killing_save(path: Path, payload: dict, _real=kd.records.save_checkpoint) -> None:
    last = path.name == "last.pt"
    counts["checkpoints"] += last
    if last and point == "pre-ckpt" and counts["checkpoints"] == target:
        die()
    _real(path, payload)
    if last and point == "ckpt" and counts["checkpoints"] == target:
        die()


kd.engine.epoch_generator = counting_generator
kd.engine.batches = killing_batches
kd.records.save_checkpoint = killing_save

if __name__ == "__main__":
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")  # as a script, so Hydra finds conf/ beside it
