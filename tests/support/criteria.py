"""Inputs, reference computations and tiny bound models shared by the method tests (tests/methods/)."""
import functools
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

import kd.config  # noqa: F401  (registers the typed root schema)
from kd.methods.base import Step
from kd.methods.hooks import capture
from kd.models.cifar_resnet import resnet8

CONF = Path(__file__).resolve().parents[2] / "conf"
F64 = torch.float64


TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


ALPHAS = (0.0, 0.1, 0.5, 0.9, 1.0)


CLASS_COUNTS = (10, 100)


BATCH = 8


def make_logits(num_classes: int, seed: int = 0, batch: int = BATCH, scale: float = 3.0):
    """Student logits, teacher logits and labels in float64, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(batch, num_classes, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, num_classes, (batch,), generator=g)
    return student, teacher, targets


def reference_softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over classes, written out with exp and sum (max subtracted for stability)."""
    shifted = logits - logits.max(dim=1, keepdim=True).values
    e = torch.exp(shifted)
    return e / e.sum(dim=1, keepdim=True)


def reference_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean over batch of sum_c p_t,c (log p_t,c - log p_s,c), p = softmax(logits / T); no T^2."""
    p_t = reference_softmax(teacher / temperature)
    p_s = reference_softmax(student / temperature)
    per_sample = (p_t * (torch.log(p_t) - torch.log(p_s))).sum(dim=1)
    return per_sample.sum() / student.shape[0]


def reference_ce(student: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over batch of -log softmax(student)[y]."""
    p = reference_softmax(student)
    picked = p[torch.arange(student.shape[0]), targets]
    return -torch.log(picked).sum() / student.shape[0]


def reference_kd_loss(student, teacher, targets, alpha: float, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: (1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_t || p_s)."""
    return (1 - alpha) * reference_ce(student, targets) + alpha * temperature**2 * reference_kl(
        student, teacher, temperature
    )


def frozen_teacher_logits(teacher: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """As kd.engine.teacher_logits: no graph for the teacher, then a normal tensor the loss may save."""
    with torch.inference_mode():
        logits = teacher(inputs)
    return logits.clone()


def compose_loss(*overrides: str):
    """The loss that conf/ composes with these overrides, instantiated."""
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = hydra.compose("config", overrides=list(overrides))
    return instantiate(cfg.loss)


@functools.lru_cache(maxsize=None)
def _option_values() -> dict[str, dict]:
    """Each criterion class's values in the first conf/loss option (by name) that builds it, as composed."""
    found: dict[str, dict] = {}
    with hydra.initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for path in sorted((CONF / "loss").glob("*.yaml")):
            loss = OmegaConf.to_container(hydra.compose("config", overrides=[f"loss={path.stem}"]).loss, resolve=True)
            for node in (loss, *loss.values()):
                if isinstance(node, dict) and "_target_" in node:
                    found.setdefault(node["_target_"], {k: v for k, v in node.items() if k != "_target_"})
    return found


def configured(cls, **values):
    """A criterion class built with the values its conf/loss option gives it (their one source), `values` replacing
    some of them: configured(ATLoss, weight=3.0) is at.yaml's AT with weight 3."""
    return cls(**{**_option_values()[f"{cls.__module__}.{cls.__name__}"], **values})


def randn(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def ref_average_pool(f: torch.Tensor, factor: int) -> torch.Tensor:
    n, c, h, w = f.shape
    out = torch.zeros(n, c, h // factor, w // factor, dtype=f.dtype)
    for y in range(h // factor):
        for x in range(w // factor):
            out[:, :, y, x] = f[:, :, y * factor:(y + 1) * factor, x * factor:(x + 1) * factor].sum((2, 3)) / factor**2
    return out


LABELS = torch.arange(24) % 4  # a training split of 24 samples in 4 classes


def tiny_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    student, teacher = resnet8(num_classes=4, width=0.25), resnet8(num_classes=4, width=0.5)
    return student.train(), teacher.eval()


def probe_images(size: int = 8) -> torch.Tensor:
    return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(9))


def bind(criterion, student=None, teacher=None):
    if student is None:
        student, teacher = tiny_models()
    criterion.bind(student, teacher, probe_images(), LABELS)
    return student, teacher


def forward_step(criterion, student, teacher, index=None, seed=5) -> tuple[Step, dict]:
    """One training step as the engine runs it: hooks on both models, the teacher under inference_mode."""
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    index = torch.tensor([0, 5, 10, 15]) if index is None else index
    student_layers, teacher_layers = criterion.layers()
    with capture(student, student_layers) as captured:
        logits = student(images)
    student_features = dict(captured)
    with torch.inference_mode(), capture(teacher, teacher_layers) as captured:
        teacher_logits = teacher(images)
    teacher_features = {name: value.clone() for name, value in captured.items()}
    step = Step(logits, LABELS[index], teacher_logits.clone(), student_features, teacher_features, index=index)
    return step, criterion(step)


def preset(name: str):
    node = OmegaConf.load(CONF / "loss" / f"{name}.yaml")
    if "crd" in node:
        assert node.crd.num_negatives == 16384 and node.crd.feat_dim == 128
        assert node.crd.temperature == 0.07 and node.crd.momentum == 0.5
        node.crd.num_negatives = 4  # 24 training samples here
    return instantiate(node)
