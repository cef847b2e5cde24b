"""Fixtures shared by several test modules, the order in which pytest-xdist hands the files out, and OpenMP's wait
policy for every process the tests start."""
import os

# OpenMP threads that wait by spinning take the cores from every other process: on this 2-core machine, shared by two
# test workers and their runs, an epoch of a 2-thread CRD student took 22 s spinning and 1.4 s passive, to the same
# bits. Set before torch loads OpenMP (it reads the policy once); runs started from here inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The files that take longest (the sums of their tests' --durations in a full run with -n 2 on a shared 2-core
# machine: the ranking is what matters), longest first. --dist loadfile hands whole files to the two workers as they
# free up, in collection order (pyproject's --no-loadscope-reorder keeps it): longest first (longest-processing-time
# first) leaves the short files to fill the end, so neither worker is left running a long file alone. The rest
# follow in their usual order.
LONGEST_FIRST = [
    "test_records.py", "test_train.py", "test_distributed.py", "test_reliability.py", "test_sweeps.py", "test_speed.py",
    "test_config.py", "test_feedback.py", "test_gpu_check.py", "test_optuna.py", "test_streaming.py",
    "test_resume_identity.py", "test_tracking.py", "test_tables.py", "test_teacher_sources.py", "test_eval.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first (a stable sort: each file's tests keep their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
