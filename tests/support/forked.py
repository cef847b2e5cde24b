"""Scripts (train.py, support/kill_runner.py) run as real processes, forked from a server that imported torch, Hydra,
W&B and kd once: what `subprocess.run([sys.executable, script, *args])` tests, without a fresh interpreter's 4 to 5
CPU seconds of imports per run (`time python -c "import torch, hydra, wandb, kd.engine"` on this 2-core machine).

Each run is its own process (its own pid, file locks and memory; SIGKILL kills it alone), started in the given folder
with exactly the given environment. Its stdout and stderr go through FIFOs read here until every process holding them
has closed them, as subprocess.run's pipes are: a run's end is awaited with its DataLoader workers' (which hold its
folder's lock until they exit).
Where a test needs what only a fresh interpreter shows (sys.path of `python tools/X.py`, torchrun, joblib's and
submitit's own workers), it starts one itself.
"""
import atexit
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[2]
_server: list = []  # the forkserver context, once started
_starting = threading.Lock()  # multiprocessing's bookkeeping of children is not thread-safe


def _context():
    """The forkserver context; its server imports support.warm (everything a tiny run imports) before any fork."""
    if not _server:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["support.warm"])
        # Python 3.11's server ignores this process's sys.path (and ignores a failed preload): it finds support.warm
        # and kd through PYTHONPATH, set for its start alone; each run checks that the preload happened.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO), *filter(None, [saved])])
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
        # Stopped and reaped at exit: no zombie, and `time` counts its runs' CPU in this process's children's.
        atexit.register(multiprocessing.forkserver._forkserver._stop)
        _server.append(context)
    return _server[0]


def _main(argv: list[str], cwd: str, env: dict, outputs: list[str]) -> None:
    """In the forked process: become `python *argv` (argv[0] a script) in cwd with env, its stdout written to the FIFO
    outputs[0] and its stderr to outputs[-1] (the same one when there is one), then exit with its exit code."""
    if "support.warm" not in sys.modules:
        raise RuntimeError("the fork server did not import support.warm: run `python -c 'import support.warm'` in "
                           "tests/ to see why")
    fds = {path: os.open(path, os.O_WRONLY) for path in outputs}
    for target, path in ((1, outputs[0]), (2, outputs[-1])):
        os.dup2(fds[path], target)
    for fd in fds.values():
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # the server's OpenMP read its environment at import: apply the one given here
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    multiprocessing.set_start_method(None, force=True)  # DataLoader workers fork, as in `python script`
    script = str(Path(argv[0]).resolve())
    sys.argv = list(argv)
    sys.path.insert(0, str(Path(script).parent))  # as `python script` puts the script's folder first
    code = _run(script)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Output:
    """A FIFO a run writes into, read by a thread here until every writer closed it (EOF), as a pipe is."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="forked-")
        self.path = os.path.join(self.folder, "output")
        os.mkfifo(self.path)
        reader = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._holder: Optional[int] = os.open(self.path, os.O_WRONLY)  # no EOF before the run has opened it
        os.set_blocking(reader, True)
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._drain, args=(reader,), daemon=True)
        self._thread.start()

    def _drain(self, reader: int) -> None:
        while chunk := os.read(reader, 1 << 16):
            self._chunks.append(chunk)
        os.close(reader)

    def text(self) -> str:
        """What was read so far, decoded as subprocess's text mode does (universal newlines)."""
        text = b"".join(self._chunks).decode(errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def close(self, timeout: float) -> bool:
        """Stop holding the FIFO open; True once every other writer closed it too, within timeout seconds."""
        if self._holder is not None:
            os.close(self._holder)
            self._holder = None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        shutil.rmtree(self.folder, ignore_errors=True)
        return True


def _run(script: str) -> int:
    """The exit code `python script` ends with: 0, SystemExit's code, or 1 after printing an uncaught traceback."""
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit_:  # as the interpreter ends: None is 0, a message is printed and exits 1
        if isinstance(exit_.code, str):
            print(exit_.code, file=sys.stderr)
        code = 1 if isinstance(exit_.code, str) else exit_.code or 0
    except BaseException:  # noqa: BLE001  (a script's uncaught error: printed, exit code 1)
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # os._exit skips them; a normal interpreter exit runs them
    return int(code)


class Started:
    """A started script: pid, poll(), kill() and wait(timeout), which returns a subprocess.CompletedProcess with the
    process's stdout and stderr together in .stdout, or apart in .stdout and .stderr (separate=True)."""

    def __init__(self, args: list[str], cwd: Path, env: Optional[dict], separate: bool = False):
        self.args = args
        self._outputs = [_Output() for _ in range(2 if separate else 1)]
        environ = dict(os.environ if env is None else env)
        paths = [output.path for output in self._outputs]
        self._process = _context().Process(target=_main, args=(list(args), str(cwd), environ, paths))
        with _starting:
            self._process.start()
        self.pid = self._process.pid

    def poll(self) -> Optional[int]:
        """The exit code (negative: the signal that killed it), or None while it runs."""
        return self._process.exitcode

    def kill(self) -> None:
        """SIGKILL, as Popen.kill."""
        if self._process.exitcode is None:
            self._process.kill()

    def output(self) -> str:
        """What it printed so far (stdout and stderr)."""
        return "".join(output.text() for output in self._outputs)

    def wait(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Its end and its children's closing its output; past timeout seconds it is killed and TimeoutExpired
        raised."""
        deadline = time.monotonic() + timeout
        self._process.join(timeout)
        ended = self._process.exitcode is not None
        if not ended:
            self.kill()
            self._process.join()
        closed = [output.close(max(0.0, deadline - time.monotonic())) for output in self._outputs]
        if not (ended and all(closed)):
            raise subprocess.TimeoutExpired(self.args, timeout, self.output())
        return subprocess.CompletedProcess(self.args, self._process.exitcode, *(o.text() for o in self._outputs))


def start(args: list[str], cwd: Path = REPO, env: Optional[dict] = None, separate: bool = False) -> Started:
    """Start `python args[0] args[1:]` (args[0] a script path, relative to cwd) in cwd with env (default: this
    process's environment)."""
    return Started(args, cwd, env, separate)


def run(args: list[str], cwd: Path = REPO, env: Optional[dict] = None, timeout: float = 600,
        separate: bool = False) -> subprocess.CompletedProcess:
    """Run `python args[0] args[1:]` to its end: as subprocess.run with text=True and stdout=PIPE, and
    stderr=STDOUT (or stderr=PIPE when separate)."""
    return start(args, cwd, env, separate).wait(timeout)


def wait_for(path: Path, started: Started, timeout: float = 240) -> None:
    """Wait until `path` exists while `started` runs (a run paused by support/kill_runner.py touches it)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert started.poll() is None and time.monotonic() < deadline, started.output()
        time.sleep(0.05)
