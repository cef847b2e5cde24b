"""support.forked runs a script as `python script` does: the tests that fork train.py from its warm server check what
a user's command prints and returns."""
import subprocess
import sys

from support import forked
from support.runs import REPO, TINY


def test_a_forked_train_py_prints_and_exits_as_a_fresh_interpreter_does(tmp_path):
    """A refused run (a student whose teacher is missing: start-up, then an error, no training) by a fresh interpreter,
    then forked: the same exit code and the same stdout and stderr, byte for byte, start-up output included (what the
    server imported printed nothing a fresh interpreter prints). The fresh interpreter costs ~5 CPU s of imports."""
    args = ["train.py", *TINY, "phase=student", "epochs=1", f"teacher_store={tmp_path / 'teachers'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    fresh = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 1 and fresh.stderr.startswith("Error: no trained teacher"), fresh.stderr
    again = forked.run(args, REPO, separate=True)
    assert (again.returncode, again.stdout, again.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
