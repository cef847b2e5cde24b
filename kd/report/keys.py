"""What a run is to the report: the config keys that make an experiment (group_key), the names the papers' tables
give a method and a pair (kd.labels, which W&B's tags share), the metrics a table may show, and how a key's value is
shown."""
import json
import math
from typing import Any, Sequence

from kd import records
from kd.labels import BASELINE, CRITERION_NAMES, criterion_name, method_name, model_label, pair_label  # noqa: F401
from kd.records import RESULT_NEUTRAL, is_under

# Config keys (and their subtrees) that do not change the experiment: runs differing only here are one group.
# What a resumed run may change, plus the teacher's path: a teacher is identified by its weights (TEACHER_SHA, from
# result.json), so the same teacher found by `auto` on one machine and given by path on another is one experiment.
IGNORED_KEYS = RESULT_NEUTRAL + ("teacher_checkpoint", "teachers_dir")
TEACHER_SHA = "teacher/sha256"  # a group key from result.json: runs with other teacher weights are other groups
# What a phase never reads: a teacher run trains with cross-entropy and has no student or teacher_seed.
UNUSED_BY_PHASE = {"teacher": ("student", "loss", "teacher_seed")}
SEED_KEY = "seed"
METHOD = "method"  # the pseudo-key naming the loss (KD, CE, DKD, FitNet, KD+CRD); pivots may use it
PAIR = "pair"  # the pseudo-key naming a student run's teacher -> student pair; pivots may use it
MISSING = "–"  # shown for a key a group's config does not have (e.g. loss.alpha of a CE run)
METRICS = {"last": "test/acc1", "best": "test/acc1_best"}  # --metric's names for test top-1; any result.json key too


def flatten(tree: Any) -> dict[str, Any]:
    """The config as dotted keys (records.flatten_config), lists and empty dicts as JSON text so values are hashable."""
    return {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in records.flatten_config(tree).items()}


def is_ignored(key: str) -> bool:
    return is_under(key, (SEED_KEY, *IGNORED_KEYS))


def group_key(result: dict[str, Any], linked: set[str] = frozenset()) -> dict[str, Any]:
    """The experiment a run belongs to: its flattened config minus the seed, IGNORED_KEYS and what its phase
    never reads, plus method, pair and the teacher's weights (their sha256; "${seed}" when each seed has its own
    teacher). `linked`: the keys whose unresolved value is `${seed}` (run.json's seed_linked): they follow the seed."""
    config = result.get("config", {})
    unused = UNUSED_BY_PHASE.get(str(config.get("phase")), ())
    flat = {k: v for k, v in flatten(config).items() if not is_ignored(k) and not is_under(k, unused)}
    flat.update({k: "${" + SEED_KEY + "}" for k in linked if k in flat})
    pseudo = {METHOD: method_name(config)}
    if config.get("phase") == "student" and "teacher" in config and "student" in config:
        pseudo[PAIR] = pair_label(config)
    if result.get(TEACHER_SHA):
        pseudo[TEACHER_SHA] = "${" + SEED_KEY + "}" if "teacher_seed" in linked else result[TEACHER_SHA]
    return {**pseudo, **flat}


def fmt_value(value: Any, key: str = "") -> str:
    """A config value as a table shows it: 0.9, 4, 0.25; a `_target_` by its last name (resnet8); a sha256 by its
    first 12 digits."""
    if isinstance(value, float):
        return f"{value:g}"
    if key == TEACHER_SHA and isinstance(value, str):
        return value[:12]
    if key.endswith("_target_") and isinstance(value, str):
        return value.rsplit(".", 1)[-1]
    return str(value)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """Each key's last dotted part (alpha, width) unless two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a table may average."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_name(metric: str) -> str:
    """--metric's value as the report names it: test/acc1 is `last`, test/acc1_best is `best`, other keys as given."""
    return next((name for name, key in METRICS.items() if key == metric), metric)


def metric_key(name: str) -> str:
    """The result.json key of a metric name (last -> test/acc1)."""
    return METRICS.get(name, name)


def metric_column(name: str) -> str:
    """A metric's name in CSV headers: test_acc1_last, test_acc1_best, val_acc1."""
    return f"test_acc1_{name}" if name in METRICS else name.replace("/", "_")


def lower_is_better(name: str) -> bool:
    """Whether the best of a metric is its lowest mean: a loss (val/loss, train/loss_kd)."""
    return "loss" in metric_key(name).rsplit("/", 1)[-1]
