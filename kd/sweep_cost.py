"""What a sweep costs, logged before its first job (kd.sweep.SweepChecks): its runs, the teachers it trains first, and
GPU-hours estimated from counted FLOPs at a stated throughput.

A student run costs (epochs + init-stage epochs) x training images x (3 x the student's forward FLOPs + the teacher's
forward FLOPs when its loss reads the teacher): forward and backward of the student are about three forward passes,
and the teacher runs forward on every step (the teacher cache, evaluation and the adapters are not counted). A
teacher trained first costs its recipe's epochs x training images x 3 x its forward FLOPs. Forward FLOPs are counted
once per model by torch.utils.flop_counter on the meta device (no memory, no data; a multiply-add counts 2).

The jobs' configs are built without composing each job: each swept value is composed once (a config group such as
experiment=... or loss=...) or set directly (a plain value such as seed=3), and a job takes the config nodes its
values change; a job whose values change one node differently is composed whole.
"""
import functools
import json
import logging
from typing import Any, Optional, Sequence

import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from kd import stages, teachers

log = logging.getLogger(__name__)

ASSUMED_TFLOPS = 10.0  # achieved, not peak: CIFAR-sized convnets at batch 64 reach a few percent of a GPU's peak
# Training images of the datasets whose size is known without reading them (the official splits).
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "tiny_imagenet": 100_000, "imagenet": 1_281_167}
DIGITS_IMAGES = 1_797  # scikit-learn's digits; kd.data.digits holds test_fraction of them out
ABSENT = object()


def describe(config: DictConfig, grid: Optional[Sequence[Sequence[str]]], excluded: int = 0) -> Optional[str]:
    """The line SweepChecks logs: runs, teachers to train first, estimated GPU-hours; None for a sweep without a grid
    (a search such as optuna's)."""
    if grid is None:
        return None
    runs = f"{len(grid)} runs" + (f" ({excluded} excluded by hydra.sweeper.exclude)" if excluded else "")
    try:
        jobs, teachers_flops = sweep_flops(config, grid)
    except Exception as error:  # an estimate never stops a sweep
        return f"{runs}; no GPU-hour estimate ({type(error).__name__}: {error})"
    if jobs is None:
        return f"{runs}; no GPU-hour estimate (the training-set size of dataset {teachers_flops} is not known here)"
    hours = [flops / (ASSUMED_TFLOPS * 1e12) / 3600 for flops in (jobs, sum(teachers_flops.values()))]
    teachers_ = f"{len(teachers_flops)} teacher{'' if len(teachers_flops) == 1 else 's'} to train first"
    return (f"{runs}, {teachers_}: about {fmt_hours(sum(hours))} GPU-hours ({fmt_hours(hours[0])} for the runs, "
            f"{fmt_hours(hours[1])} for the teachers), from counted FLOPs (epochs x training images x (3 x the "
            f"student's forward + the teacher's forward)) at an assumed {ASSUMED_TFLOPS:g} TFLOP/s achieved")


def fmt_hours(hours: float) -> str:
    """Hours to three significant digits at most: 223, 4.1, 0.021."""
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2g}" if hours < 10 else f"{hours:.1f}"


def sweep_flops(config: DictConfig, grid: Sequence[Sequence[str]]) -> tuple[Optional[float], Any]:
    """The FLOPs of every job, and of each teacher to train first by its store entry; (None, dataset name) when a
    dataset's size is unknown."""
    total, to_train = 0.0, {}
    for cfg, count in job_configs(config, grid):
        images = train_images(cfg.dataset)
        if images is None:
            return None, cfg.dataset.name
        flops, teacher = run_flops(cfg, images)
        total += count * flops
        to_train.update(teacher)
    return total, to_train


def run_flops(cfg: DictConfig, images: int) -> tuple[float, dict[str, float]]:
    """A job's FLOPs and, when it will train its missing teacher first, {store entry: that teacher's FLOPs}."""
    size = int(cfg.dataset.source.get("image_size", 32))
    teacher_forward = model_flops(json.dumps(OmegaConf.to_container(cfg.teacher), sort_keys=True), size)
    teacher_training = cfg.teacher_recipe.epochs * images * 3 * teacher_forward
    if cfg.phase == "teacher":
        return teacher_training, {}
    student_forward = model_flops(json.dumps(OmegaConf.to_container(cfg.student), sort_keys=True), size)
    needs, init_epochs = criterion_needs(json.dumps(OmegaConf.to_container(cfg.loss), sort_keys=True))
    flops = (cfg.epochs + init_epochs) * images * (3 * student_forward + (teacher_forward if needs else 0))
    wanted = needs or (cfg.train_missing_teacher and cfg.teacher_checkpoint == "auto")
    if not (wanted and teachers.from_store(cfg)):
        return flops, {}
    entry = teachers.entry_dir(cfg, cfg.teacher_seed)
    return flops, {} if teachers.newest_complete(entry) is not None else {str(entry): teacher_training}


def train_images(dataset: DictConfig) -> Optional[int]:
    """The number of training images (less the validation split), None for a dataset whose size is not known here."""
    if dataset.name == "digits":
        total = DIGITS_IMAGES - round(DIGITS_IMAGES * dataset.source.test_fraction)
    elif dataset.name in TRAIN_IMAGES:
        total = TRAIN_IMAGES[dataset.name]
    else:
        return None
    return total - round(total * dataset.val_fraction)


@functools.lru_cache(maxsize=None)
def model_flops(node: str, image_size: int) -> float:
    """Forward FLOPs of one image through the model a config node (JSON) builds, counted on the meta device."""
    with torch.device("meta"):
        model = instantiate(json.loads(node)).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, image_size, image_size, device="meta"))
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def criterion_needs(node: str) -> tuple[bool, int]:
    """Whether a loss (JSON) reads the teacher, and its init stage's epochs."""
    criterion = instantiate(json.loads(node))
    return stages.needs_teacher(criterion), criterion.init_epochs


# ---------------------------------------------------------------- the jobs' configs


def job_configs(config: DictConfig, grid: Sequence[Sequence[str]]) -> list[tuple[DictConfig, int]]:
    """The jobs' distinct resolved configs, each with how many jobs have it (jobs that differ only in a seed that
    nothing but `seed` reads cost the same)."""
    distinct: dict[str, list] = {}
    for tree in job_trees(config, grid):
        text = json.dumps(tree, sort_keys=True, default=str)
        if "${seed}" not in text:
            text = json.dumps({**tree, "seed": None}, sort_keys=True, default=str)
        distinct.setdefault(text, [tree, 0])[1] += 1
    return [(resolved(tree), count) for tree, count in distinct.values()]


def job_trees(config: DictConfig, grid: Sequence[Sequence[str]]) -> list[dict]:
    """Each job's config (without `hydra`) as an unresolved plain tree, from one composition per swept value."""
    base = plain(config)
    swept = swept_values(grid)
    fixed = [o for o in grid[0] if o.split("=", 1)[0] not in swept] if grid else []
    changes = {(key, value): value_change(config, base, fixed, key, value)
               for key, values in swept.items() for value in values}
    trees = []
    for job in grid:
        pairs = [tuple(o.split("=", 1)) for o in job]
        merged = merge(base, [changes[pair] for pair in pairs if pair[0] in swept])
        trees.append(merged if merged is not None else plain(compose(config, list(job))))
    return trees


def resolved(tree: dict) -> DictConfig:
    """A plain config tree as a DictConfig with its interpolations resolved."""
    cfg = OmegaConf.create(tree)
    OmegaConf.resolve(cfg)
    return cfg


def swept_values(grid: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """The keys whose value differs between the grid's jobs, with their values in order."""
    values: dict[str, list[str]] = {}
    for job in grid:
        for override in job:
            key, value = override.split("=", 1)
            values.setdefault(key, [])
            if value not in values[key]:
                values[key].append(value)
    return {key: found for key, found in values.items() if len(found) > 1}


def value_change(config: DictConfig, base: dict, fixed: list[str], key: str, value: str) -> dict[str, tuple]:
    """What one swept value changes: {dotted path: ("node" or "leaf", value)}; a group (or +, ~, @) is composed."""
    (override,) = OverridesParser.create().parse_overrides([f"{key}={value}"])
    current = lookup(base, key)
    if "@" not in key and not key.startswith(("+", "~")) and current is not None and not isinstance(current, dict):
        parsed = override.value()
        if isinstance(current, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)  # as the typed schema would store it
        return {key: ("leaf", parsed)}
    composed = plain(compose(config, [*fixed, f"{key}={value}"]))
    return {top: ("node", composed[top]) if top in composed else ("drop", None) for top in set(base) | set(composed)
            if composed.get(top, ABSENT) != base.get(top, ABSENT)}


def merge(base: dict, changes: Sequence[dict[str, tuple]]) -> Optional[dict]:
    """The base with the nodes, then the leaves, of the changes set; None when two changes set one path differently."""
    seen: dict[str, Any] = {}
    for change in changes:
        for path, setting in change.items():
            if seen.setdefault(path, setting) != setting:
                return None
    merged = dict(base)  # copied on write (assign): the base and the changes are shared, never changed
    for kind in ("drop", "node", "leaf"):
        for path, (found, value) in seen.items():
            if found == kind:
                assign(merged, path, value, drop=kind == "drop")
    return merged


def lookup(tree: dict, path: str) -> Any:
    """The value at a dotted path, None when there is none."""
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def assign(tree: dict, path: str, value: Any, drop: bool = False) -> None:
    """Set (or, with drop, remove) the value at a dotted path, copying the dicts on the way (never changing them)."""
    *parents, last = path.split(".")
    for part in parents:
        tree[part] = dict(tree.get(part) or {})
        tree = tree[part]
    if drop:
        tree.pop(last, None)  # a node the value's composition does not have
    else:
        tree[last] = value


def plain(config: DictConfig) -> dict:
    """The config without `hydra`, unresolved, as plain containers (enums as their names)."""
    tree = OmegaConf.to_container(config, resolve=False, enum_to_str=True)
    tree.pop("hydra", None)
    return tree


def compose(config: DictConfig, overrides: list[str]) -> DictConfig:
    """A job's config as Hydra composes it in a sweep (the sweep config's Hydra overrides, then the job's)."""
    return GlobalHydra.instance().config_loader().load_sweep_config(config, overrides)
