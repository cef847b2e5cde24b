"""train.py that records every view the streaming path decodes, so tests can check which process decoded what.

    KD_DECODE_LOG=DIR python tests/support/count_decodes.py <train.py arguments>   # or under torchrun

Each decoded view appends a line "<split> <epoch> <index>" (epoch -1 for an evaluation view) to DIR/rank<RANK>.log.
The hook is installed before any DataLoader starts, so the forked workers carry it; their appends are single small
writes to a file opened for appending, which do not interleave. The hook lives here, not in kd/.
"""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import kd.streaming  # noqa: E402

LOG = Path(os.environ["KD_DECODE_LOG"]) / f"rank{os.environ.get('RANK', '0')}.log"


def logged_item(views, key, _real=kd.streaming.Views.__getitem__):
    training = isinstance(key, kd.streaming.ViewKey)
    line = f"{views.split} {key.epoch if training else -1} {key.index if training else int(key)}\n"
    with open(LOG, "a") as log:
        log.write(line)
    return _real(views, key)


kd.streaming.Views.__getitem__ = logged_item

if __name__ == "__main__":
    sys.argv[0] = str(REPO / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
