"""Fixtures shared by several test modules, the order in which pytest-xdist hands the files out, and OpenMP's wait
policy for every process the tests start."""
import os

# OpenMP threads that wait by spinning take the cores from every other process: on this 2-core machine, shared by two
# test workers and their runs, an epoch of a 2-thread CRD student took 22 s spinning and 1.4 s passive, to the same
# bits. Set before torch loads OpenMP (it reads the policy once); runs started from here inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# The files that take longest (CPU seconds, -n 0, measured on 2 cores), longest first. With --dist loadfile the two
# workers take files in collection order as they free up: starting with the longest (longest-processing-time first)
# leaves short files to fill the end, so neither worker is left running a long file alone. The rest follow in their
# usual order.
LONGEST_FIRST = [
    "test_records.py", "test_distributed.py", "test_train.py", "test_sweeps.py", "test_streaming.py",
    "test_reliability.py", "test_gpu_check.py", "test_speed.py", "test_teacher_sources.py", "test_report.py",
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
