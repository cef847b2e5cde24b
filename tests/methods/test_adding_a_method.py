"""Adding a method is one file in kd/methods/, one conf/loss YAML and one test file: in a copy of the repository with
only those three added, the unedited config test (tests/test_config.py), the sync and teacher-cache test
(tests/test_hot_path.py, which also reads the new option's teacher logits from the cache) and the method's own test
collect the new option and pass.

A subprocess on a copy: the tests parametrise over conf/loss/*.yaml when pytest collects them, so only a fresh
pytest run over a tree holding the new files shows that they are picked up with no other edit.
"""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import tree_state

REPO = Path(__file__).resolve().parents[2]

# The worked example of the README's "Adding a method": DeiT's hard-label distillation (Touvron et al., ICML 2021).
METHOD = '''\
"""Touvron et al. ICML 2021 (DeiT), hard-label distillation: CE on the teacher's top class. conf/loss/hard_kd.yaml."""
import torch.nn.functional as F
from torch import Tensor

from kd.methods.base import Criterion, Step, check_non_negative


def hard_distillation(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean over samples of -log softmax(z_s)[argmax z_t]: the teacher's decision as the label."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(dim=1))


class HardKDLoss(Criterion):
    """weight * CE(z_s, argmax z_t); DeiT weighs it and the label CE 1/2 each (conf/loss/hard_kd.yaml)."""

    def __init__(self, weight: float = 0.5):
        super().__init__()
        check_non_negative(weight=weight)
        self.weight = weight

    def forward(self, step: Step) -> dict[str, Tensor]:
        return {"loss_hard_kd": self.weight * hard_distillation(step.student_logits, step.teacher_logits)}
'''
YAML = """# DeiT's hard-label distillation (Touvron et al., ICML 2021): 0.5 * CE(z_s, y) + 0.5 * CE(z_s, argmax z_t).
_target_: kd.methods.base.Combined
ce:
  _target_: kd.methods.base.CELoss
  weight: 0.5
hard_kd:
  _target_: kd.methods.hard_kd.HardKDLoss
  weight: 0.5
"""
TEST = '''"""Hard-label distillation (kd/methods/hard_kd.py) against its formula written with a loop."""
import math

import pytest
import torch

from kd.methods.base import Step
from kd.methods.hard_kd import HardKDLoss


def test_hard_kd_is_the_cross_entropy_on_the_teachers_top_class():
    student, teacher = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    rows = [math.log(sum(math.exp(v) for v in s.tolist())) - float(s[int(t.argmax())])
            for s, t in zip(student, teacher)]
    terms = HardKDLoss(weight=0.5)(Step(student, torch.zeros(4, dtype=torch.long), teacher))
    assert terms["loss_hard_kd"].item() == pytest.approx(0.5 * sum(rows) / 4)
'''
NEW_FILES = {"kd/methods/hard_kd.py": METHOD, "conf/loss/hard_kd.yaml": YAML, "tests/methods/test_hard_kd.py": TEST}
EXPECTED = {
    "tests/test_config.py::test_loss_option_instantiates_and_returns_finite_terms[hard_kd]",
    "tests/test_hot_path.py::test_a_training_step_never_waits_for_the_device[hard_kd]",
    "tests/methods/test_hard_kd.py::test_hard_kd_is_the_cross_entropy_on_the_teachers_top_class",
}


def repository_copy(root: Path) -> Path:
    """What the tests run on (kd, conf, tests, train.py, pyproject.toml), copied under root."""
    for name in ("kd", "conf", "tests"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("train.py", "pyproject.toml"):
        shutil.copy2(REPO / name, root / name)
    return root


@pytest.mark.slow  # one pytest process on a copy: ~30 s on 2 CPU cores
def test_a_new_logit_method_is_one_file_one_yaml_and_one_test(tmp_path):
    copy = repository_copy(tmp_path / "repo")
    for relative, text in NEW_FILES.items():
        assert not (copy / relative).exists(), relative
        (copy / relative).write_text(text)
    before = tree_state(REPO / "conf")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-n", "0", "-k", "hard_kd",
         "tests/test_config.py", "tests/test_hot_path.py", "tests/methods/test_hard_kd.py"],
        cwd=copy, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert set(re.findall(r"^PASSED (\S+)", run.stdout, flags=re.MULTILINE)) == EXPECTED, run.stdout[-4000:]
    assert tree_state(REPO / "conf") == before  # the copy, not this repository, got the new option
