"""Typed root schema: a typo or a wrong type in a config or an override fails at composition; what the schema cannot
type (the `_target_` nodes' arguments, NaN and inf) is checked by `value_problems` before any work starts."""
import difflib
import inspect
import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum, StrEnum
from typing import Any, Iterator, Optional

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import InterpolationValidationError

from kd.records import bounded_name
from kd.teacher_cache import DTYPES


class Phase(Enum):
    teacher = "teacher"
    student = "student"

    def __str__(self) -> str:  # so ${phase} in paths reads "student", not "Phase.student"
        return self.value


# StrEnums: a typo fails at composition with the valid values, and each member is also the string itself, so the code
# and W&B that compare or pass the value as a string work unchanged (records store the plain string: plain_config).
class LoggerMode(StrEnum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Precision(StrEnum):
    auto = "auto"  # bf16 autocast on GPUs of compute capability 8.0 and up, fp16 below, fp32 on the CPU
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"  # with a gradient scaler


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
    # What a dataset is and how it is augmented: each conf/dataset option gives these (with their sources).
    name: str = MISSING
    num_classes: int = MISSING
    mean: list[float] = MISSING
    std: list[float] = MISSING
    crop_padding: int = MISSING
    hflip: bool = MISSING
    # The same default for every dataset: the fraction of the training split held out to validate, its draw's seed.
    val_fraction: float = 0.0
    split_seed: int = 0
    source: Any = MISSING  # a `_target_` node returning kd.data.Splits


@dataclass
class LoggerConfig:
    # An explicit mode beats the WANDB_MODE variable, which beats the offline default.
    mode: LoggerMode = "${oc.env:WANDB_MODE,offline}"  # a bad WANDB_MODE is refused by value_problems
    project: str = "kd"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # An online start that has not reached W&B within this many seconds falls back to offline.
    init_timeout_s: float = 30.0


@dataclass
class PairHparams:
    """Per-pair values a method's paper tuned, set by the pair presets (conf/experiment/*.yaml) and read by the loss
    options as ${coalesce:${pair_hparams.<key>},<the option's own value>}: None leaves the option's value."""

    kd_alpha: Optional[float] = None  # kd
    kd_temperature: Optional[float] = None  # kd
    dkd_beta: Optional[float] = None  # dkd; dkd_ls without dkd_ls_beta
    dkd_temperature: Optional[float] = None  # dkd
    dkd_warmup_epochs: Optional[int] = None  # dkd
    kd_ls_temperature: Optional[float] = None  # kd_ls
    kd_ls_weight: Optional[float] = None  # kd_ls
    dkd_ls_temperature: Optional[float] = None  # dkd_ls
    dkd_ls_weight: Optional[float] = None  # dkd_ls
    dkd_ls_beta: Optional[float] = None  # dkd_ls
    reviewkd_weight: Optional[float] = None  # reviewkd
    ft_init_lr: Optional[float] = None  # ft (its init stage's lr: 0.05 for vgg8 students)


@dataclass
class Config:
    phase: Phase = Phase.teacher
    seed: int = 0
    # The student's recipe: conf/config.yaml gives epochs and batch_size (with their source), optimizer and scheduler.
    epochs: int = MISSING
    batch_size: int = MISSING
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
    # Without a progress bar (a log file: SLURM, nohup, joblib): a line every this many seconds with img/s and the
    # run's ETA (0: every step; None: none).
    progress_every_s: Optional[float] = 60.0
    # run_name=NAME runs in outputs/runs/NAME (a multirun in outputs/multirun/NAME) instead of a folder named by the
    # time, so that rerunning the same command resumes it (conf/config.yaml's hydra.run.dir).
    run_name: Optional[str] = None
    # True: bitwise-repeatable CUDA kernels (slower; ops without a deterministic kernel raise); False: cuDNN autotuning.
    deterministic: bool = False
    # auto: bf16 autocast on CUDA, fp32 on the CPU; fp16 adds a gradient scaler.
    precision: Precision = Precision.auto
    # NHWC activations (tensor cores and oneDNN prefer them); same results up to rounding. On the CPU, strided 1x1
    # convolutions are routed around torch 2.14's crashing NHWC backward (kd/cpu_conv.py); CPU DDP stays NCHW.
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
    # Typed, so a misspelt key (pair_hparams.dkd_betta=2) fails at composition instead of leaving the default.
    pair_hparams: PairHparams = field(default_factory=PairHparams)
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
# Used by a model option's defaults list (`/library_model_schema@_here_`), so its node is typed with `name`. Stored
# outside any group: `--help` lists the groups, and this is no option of the command line.
ConfigStore.instance().store(name="library_model_schema", node=LibraryModelConfig)


def job_dir_name(overrides: str, number: int) -> str:
    """A sweep job's folder name: its swept overrides (hydra.job.override_dirname), bounded to a valid file name."""
    return bounded_name(overrides) if overrides else f"job{number}"


OmegaConf.register_new_resolver("kd_job_dir", job_dir_name, replace=True)


def named_dir(parent: str, name: Optional[str], default: str) -> str:
    """A run's (or a sweep's) folder: parent/name when run_name gives a name (the same command finds the same folder
    again), else the default one, named by the time."""
    return f"{parent}/{name}" if name else default


OmegaConf.register_new_resolver("kd_named_dir", named_dir, replace=True)


def coalesce(*values: Any) -> Any:
    """The first value that is not None (SQL's COALESCE): ${coalesce:${pair_hparams.dkd_beta},8.0} is the pair's
    value when its preset or the command line sets one, else the loss option's own 8.0."""
    return next((value for value in values if value is not None), None)


# Not oc.select: it returns a key's None rather than its default, and falls back silently on a misspelt key.
OmegaConf.register_new_resolver("coalesce", coalesce, replace=True)


def value_problems(cfg: DictConfig) -> list[str]:
    """What no run can use, by dotted key: values never given (???), NaN or infinite floats anywhere in the resolved
    config, values that are not numbers where a `_target_` node's callable takes a number, and an environment
    variable whose value the key it sets refuses (WANDB_MODE=loud for logger.mode, an Enum)."""
    try:
        return _resolved_problems(cfg)
    except InterpolationValidationError as error:
        reason = str(error.msg).splitlines()[0]  # its other lines repeat the key and name the schema's classes
        return [f"{error.full_key}: {reason}: set that variable to one of these values (or unset it), or give "
                f"{error.full_key}=... on the command line"]


def _resolved_problems(cfg: DictConfig) -> list[str]:
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))
    if missing:  # first: resolving the rest may read them
        return [f"{', '.join(missing)}: no value given (???): set each on the command line ({missing[0]}=...) or in "
                "the config option that should give it"]
    problems = _undeclared(cfg)
    tree = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    tree.pop("hydra", None)  # a multirun's sweep config
    nonfinite = [f"{key}={value}" for key, value in _leaves(tree)
                 if isinstance(value, float) and not math.isfinite(value)]
    if nonfinite:
        problems.append(f"{', '.join(nonfinite)}: NaN and infinite values are refused (every float setting must be a "
                        "finite number)")
    for key, node in _target_nodes(tree):
        problems += _non_numbers(key, node)
    return problems


def _undeclared(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys that `+key=value` added to a typed node (Hydra's + skips the schema's check): a misspelt setting, such as
    +pair_hparams.dkd_betta=2, would otherwise be ignored."""
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    problems = []
    for key in node.keys():
        name = f"{prefix}{key}"
        if name == "hydra":  # a multirun's sweep config
            continue
        if declared is not None and key not in declared:
            close = ", ".join(difflib.get_close_matches(str(key), sorted(declared), n=3)) or "none"
            problems.append(f"{name}: {schema.__name__} has no such setting (it was added with +; close names: "
                            f"{close}): set an existing one, without the +")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            problems += _undeclared(child, f"{name}.")
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


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


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
    if cfg.progress_every_s is not None and not cfg.progress_every_s >= 0:
        problems.append(f"progress_every_s={cfg.progress_every_s}: must be >= 0 seconds (0: a line every step), or "
                        "null for no progress lines")
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
    if cfg.compile_mode not in COMPILE_MODES:
        problems.append(f"compile_mode={cfg.compile_mode}: must be one of {', '.join(COMPILE_MODES)}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


# W&B's rules for a project name (wandb.Settings validates them in every mode, disabled too).
PROJECT_MAX_CHARS, PROJECT_FORBIDDEN = 128, "/\\#?%:"
TAG_MAX_CHARS = 64  # wandb.Settings refuses a longer tag, in every mode


def logger_problems(logger: DictConfig) -> list[str]:
    """What W&B would refuse only after run.json is written (in every mode, disabled too); logger.mode is an Enum of
    the schema (LoggerMode), refused at composition."""
    problems = []
    if not logger.init_timeout_s > 0:
        problems.append(f"logger.init_timeout_s={logger.init_timeout_s}: must be > 0 (seconds)")
    if len(logger.project) > PROJECT_MAX_CHARS:
        problems.append(f"logger.project is {len(logger.project)} characters long: W&B allows at most "
                        f"{PROJECT_MAX_CHARS}, shorten it")
    forbidden = sorted(set(logger.project) & set(PROJECT_FORBIDDEN))
    if forbidden:
        problems.append(f"logger.project={logger.project}: W&B project names cannot hold {' '.join(forbidden)}")
    return problems + tag_problems(list(logger.tags))


def tag_problems(tags: list[str]) -> list[str]:
    """What W&B would refuse in logger.tags only after run.json is written (in every mode)."""
    return [f"logger.tags has {tag!r}, {len(tag)} characters: W&B takes tags of 1 to {TAG_MAX_CHARS}, shorten it"
            for tag in map(str, tags) if not 1 <= len(tag) <= TAG_MAX_CHARS]


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
