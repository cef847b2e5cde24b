"""Typed root schema: a typo or a wrong type in a config or an override fails at composition; what the schema cannot
type (the `_target_` nodes' arguments, NaN and inf) is checked by `value_problems` before any work starts."""
import inspect
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Iterator, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf

from kd.hardware import PRECISIONS
from kd.loop import COMPILE_MODES
from kd.records import bounded_name
from kd.teacher_cache import DTYPES


class Phase(Enum):
    teacher = "teacher"
    student = "student"

    def __str__(self) -> str:  # so ${phase} in paths reads "student", not "Phase.student"
        return self.value


@dataclass
class ModelConfig:
    _target_: str = MISSING
    num_classes: int = MISSING
    width: float = 1.0


@dataclass
class LibraryModelConfig(ModelConfig):
    # The model's name in its library (torchvision.models.list_models, timm.list_models): the model options that
    # build any model of a library (conf/model/torchvision.yaml, timm.yaml) take their schema from this node.
    name: str = MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    num_classes: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    crop_padding: int = 4
    hflip: bool = True
    val_fraction: float = 0.0
    split_seed: int = 0
    source: Any = MISSING  # a `_target_` node returning kd.data.Splits


@dataclass
class LoggerConfig:
    # An explicit mode beats the WANDB_MODE variable, which beats the offline default.
    mode: str = "${oc.env:WANDB_MODE,offline}"
    project: str = "kd"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # An online start that has not reached W&B within this many seconds falls back to offline.
    init_timeout_s: float = 30.0


@dataclass
class Config:
    phase: Phase = Phase.teacher
    seed: int = 0
    epochs: int = 240
    batch_size: int = 64
    eval_batch_size: int = 512
    device: str = "auto"
    # "auto" looks the teacher up in `teacher_store`; a path loads that checkpoint; "none" runs without one;
    # torchvision:<Weights> (torchvision:ResNet34_Weights.IMAGENET1K_V1) / timm:<name> (timm:resnet50.a1_in1k) take
    # the library's pretrained weights from its cache (model@teacher=torchvision / timm must be their model).
    teacher_checkpoint: str = "auto"
    # Read only this top-level key of a pickled teacher file (e.g. `model` of RepDistiller's ckpt_*.pth), as weights:
    # for a file whose other keys hold objects (an argparse.Namespace under `opt`), which are then never built.
    teacher_checkpoint_key: Optional[str] = None
    # With teacher_checkpoint=auto: a folder of published teachers in RepDistiller's / mdistiller's layout
    # (<model>_vanilla/ckpt_epoch_240.pth) to take the teacher from, instead of the store.
    teachers_dir: Optional[str] = None
    # Student runs of every seed share the teacher trained with this seed (one teacher per table).
    teacher_seed: int = 0
    teacher_store: str = "outputs/teachers"
    # Largest allowed gap (percentage points) between a teacher's measured and recorded test top-1.
    teacher_acc_tolerance: float = 0.5
    # Student runs whose teacher is not in the store train it first (once, under a file lock).
    train_missing_teacher: bool = False
    # A teacher phase whose identity is stored returns the stored teacher; true trains a new version beside it.
    retrain_teacher: bool = False
    teacher_lock_timeout_s: float = 86400.0
    # CPU threads for this job; None keeps torch's default (train.py splits the cores between parallel jobs).
    threads: Optional[int] = None
    # Measure batch-1 latency and throughput at batch_size of the trained model (seconds of work).
    profile: bool = True
    progress_bar: Optional[bool] = None  # None: only when stderr is a terminal
    # True: bitwise-repeatable CUDA kernels (slower; ops without a deterministic kernel raise); False: cuDNN autotuning.
    deterministic: bool = False
    # auto: bf16 autocast on CUDA, fp32 on the CPU; fp16 adds a gradient scaler.
    precision: str = "auto"
    # NHWC activations on CUDA (tensor cores prefer them); same results up to rounding. CPU runs stay NCHW:
    # torch 2.14's CPU NHWC backward corrupts the heap for some shapes (kd.hardware.use_channels_last).
    channels_last: bool = True
    # torch.compile the student's training forward (its first step compiles: about a minute on a CPU), with static
    # shapes (the last, shorter batch gets a graph of its own). compile_mode=reduce-overhead also captures the
    # compiled forward and backward as CUDA graphs (CUDA only): what makes small CIFAR students fast on a GPU.
    compile: bool = False
    compile_mode: str = "default"
    # Teacher-output cache: student jobs sharing a teacher and a data seed (a sweep over alpha, T, width) read
    # the teacher's logits for each augmented view from disk instead of running the teacher again.
    teacher_cache: bool = True
    teacher_cache_dir: Optional[str] = None  # None: `teacher_cache/` beside the teacher store (outputs/teacher_cache)
    teacher_cache_dtype: str = "float32"  # float32 is exact; bfloat16/float16 halve the disk use
    teacher_cache_max_gb: float = 20.0  # least recently used entries are deleted beyond this
    # null stores every logit (exact); k stores each view's k largest (an approximation: the teacher's distribution
    # renormalised over its top k, as Fast Knowledge Distillation does): ImageNet's 1000 classes in 1% of the space.
    teacher_cache_topk: Optional[int] = None
    # Per-pair hyperparameters a method's paper tuned, set by the pair presets (conf/experiment/crd_*.yaml) and
    # read by the loss options through ${oc.select:pair_hparams.<name>,<default>}: dkd_beta (dkd), kd_ls_temperature,
    # kd_ls_weight (kd_ls), dkd_ls_temperature, dkd_ls_weight, dkd_ls_beta (dkd_ls).
    pair_hparams: dict[str, float] = field(default_factory=dict)
    dataset: DatasetConfig = MISSING
    teacher: ModelConfig = MISSING
    student: ModelConfig = MISSING
    loss: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    # The teacher phase's epochs, batch_size, optimizer and scheduler (the top-level ones are the student's).
    teacher_recipe: Any = MISSING
    logger: LoggerConfig = field(default_factory=LoggerConfig)


ConfigStore.instance().store(name="config_schema", node=Config)
# Used by a model option's defaults list (`/schema/library_model@_here_`), so its node is typed with `name`.
ConfigStore.instance().store(group="schema", name="library_model", node=LibraryModelConfig)


def job_dir_name(overrides: str, number: int) -> str:
    """A sweep job's folder name: its swept overrides (hydra.job.override_dirname), bounded to a valid file name."""
    return bounded_name(overrides) if overrides else f"job{number}"


OmegaConf.register_new_resolver("kd_job_dir", job_dir_name, replace=True)


def value_problems(cfg: DictConfig) -> list[str]:
    """What no run can use, by dotted key: NaN or infinite floats anywhere in the resolved config, and values that
    are not numbers where a `_target_` node's callable takes a number."""
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tree.pop("hydra", None)  # a multirun's sweep config
    problems = []
    nonfinite = [f"{key}={value}" for key, value in _leaves(tree)
                 if isinstance(value, float) and not math.isfinite(value)]
    if nonfinite:
        problems.append(f"{', '.join(nonfinite)}: NaN and infinite values are refused (every float setting must be a "
                        "finite number)")
    for key, node in _target_nodes(tree):
        problems += _non_numbers(key, node)
    return problems


def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a plain config tree; list items as key[i]."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def _target_nodes(tree: Any, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(dotted key, node) of every node with a `_target_` in a plain config tree (the node and its sub-nodes)."""
    if isinstance(tree, dict):
        if "_target_" in tree:
            yield prefix, tree
        for key, value in tree.items():
            yield from _target_nodes(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _target_nodes(value, f"{prefix}[{i}]")


def _non_numbers(key: str, node: dict[str, Any]) -> list[str]:
    """The node's values that are not numbers where its callable's parameter takes one (a number as its default or
    its annotation: torch.optim.SGD's lr, MultiStepLR's gamma, a loss's temperature)."""
    try:
        parameters = inspect.signature(get_object(node["_target_"])).parameters
    except Exception:  # an unknown target, or no signature: instantiate names the problem
        return []
    problems = []
    for name, parameter in parameters.items():
        if name in node and _takes_number(parameter) and not _is_number(node[name]):
            problems.append(f"{key}.{name}={node[name]!r}: must be a number ({node['_target_']} takes a number "
                            f"as {name})")
    return problems


def _takes_number(parameter: inspect.Parameter) -> bool:
    return _is_number(parameter.default) or parameter.annotation in (int, float, "int", "float")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Reject values no run can use, before any work starts."""
    wrong = value_problems(cfg)
    if wrong:  # first: the checks below compare numbers, which a NaN passes and a string breaks
        raise ValueError("invalid config: " + "; ".join(wrong))
    problems = []
    if cfg.epochs < 1:
        problems.append(f"epochs={cfg.epochs}: need at least 1")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        problems.append(f"batch_size={cfg.batch_size}, eval_batch_size={cfg.eval_batch_size}: need at least 1")
    if cfg.threads is not None and cfg.threads < 1:
        problems.append(f"threads={cfg.threads}: need at least 1 (or null for torch's default)")
    for role in ("teacher", "student"):
        if not cfg[role].width > 0:
            problems.append(f"{role}.width={cfg[role].width}: the width multiplier must be > 0 (1 = standard)")
    problems += dataset_problems(cfg.dataset) + logger_problems(cfg.logger)
    lr = cfg.optimizer.get("lr")
    if isinstance(lr, (int, float)) and lr < 0:
        problems.append(f"optimizer.lr={lr}: must be a finite number >= 0")
    if cfg.teacher_acc_tolerance < 0:
        problems.append(f"teacher_acc_tolerance={cfg.teacher_acc_tolerance}: must be >= 0 (percentage points)")
    if cfg.teacher_cache_topk is not None and not 1 <= cfg.teacher_cache_topk <= cfg.dataset.num_classes:
        problems.append(f"teacher_cache_topk={cfg.teacher_cache_topk}: must be between 1 and the "
                        f"{cfg.dataset.num_classes} classes (or null: every logit, exact)")
    if cfg.teacher_cache_dtype not in DTYPES:
        problems.append(f"teacher_cache_dtype={cfg.teacher_cache_dtype}: must be one of {', '.join(DTYPES)}")
    if cfg.precision != "auto" and cfg.precision not in PRECISIONS:
        problems.append(f"precision={cfg.precision}: must be auto, {', '.join(PRECISIONS)}")
    if cfg.compile_mode not in COMPILE_MODES:
        problems.append(f"compile_mode={cfg.compile_mode}: must be one of {', '.join(COMPILE_MODES)}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


LOGGER_MODES = ("online", "offline", "disabled")
# W&B's rules for a project name (wandb.Settings validates them in every mode, disabled too).
PROJECT_MAX_CHARS, PROJECT_FORBIDDEN = 128, "/\\#?%:"


def logger_problems(logger: DictConfig) -> list[str]:
    """What W&B would refuse only after run.json is written (in every mode, disabled too)."""
    problems = []
    if logger.mode not in LOGGER_MODES:
        problems.append(f"logger.mode={logger.mode}: must be one of {', '.join(LOGGER_MODES)}")
    if not logger.init_timeout_s > 0:
        problems.append(f"logger.init_timeout_s={logger.init_timeout_s}: must be > 0 (seconds)")
    if len(logger.project) > PROJECT_MAX_CHARS:
        problems.append(f"logger.project is {len(logger.project)} characters long: W&B allows at most "
                        f"{PROJECT_MAX_CHARS}, shorten it")
    forbidden = sorted(set(logger.project) & set(PROJECT_FORBIDDEN))
    if forbidden:
        problems.append(f"logger.project={logger.project}: W&B project names cannot hold {' '.join(forbidden)}")
    return problems


def dataset_problems(dataset: DictConfig) -> list[str]:
    """What is wrong with the dataset node's numbers: split fraction, normalisation, crop padding."""
    problems = []
    if not 0.0 <= dataset.val_fraction < 1.0:
        problems.append(f"dataset.val_fraction={dataset.val_fraction}: must be in [0, 1)")
    mean, std = list(dataset.mean), list(dataset.std)
    if len(mean) != 3 or len(std) != 3:
        problems.append(f"dataset.mean={mean}, dataset.std={std}: need one value per RGB channel (3 each)")
    if not all(math.isfinite(m) for m in mean) or not all(0 < s < math.inf for s in std):
        problems.append(f"dataset.mean={mean}, dataset.std={std}: means must be finite and stds finite and > 0")
    if dataset.crop_padding < 0:
        problems.append(f"dataset.crop_padding={dataset.crop_padding}: must be >= 0 (0 = no random crop)")
    return problems
