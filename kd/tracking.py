"""Weights & Biases: one run per job, offline by default so no account or network is needed.

A run is tagged and named as kd.report names its row (method and pair, kd.labels), with the conf/loss option it ran;
a teacher filed in the store is its run's model artifact, which each student run of that teacher uses, so W&B shows
the lineage; under W&B's own sweep agent a run logs under the agent's run id and project. W&B's console banners are
off: one line of ours says where a run is (once per sweep for offline jobs). A resumed run's W&B segment logs the
epochs before its checkpoint again, so the newest segment holds the whole history.
"""
import copy
import hashlib
import json
import logging
import os
import re
import secrets
import string
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import wandb
from omegaconf import DictConfig

from kd import distributed, teachers
from kd.config import TAG_MAX_CHARS, Phase
from kd.labels import method_name, model_label, pair_label
from kd.records import model_name, plain_config

log = logging.getLogger(__name__)

ARTIFACT_NAME_MAX_CHARS = 128
# What `wandb agent` sets for each run it starts, besides WANDB_PROJECT and WANDB_ENTITY.
AGENT_SWEEP_ID, AGENT_RUN_ID = "WANDB_SWEEP_ID", "WANDB_RUN_ID"
_hinted_sweeps: set[Path] = set()  # sweep folders whose offline runs this process has said how to upload


def run_tags(cfg: DictConfig, choices: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Tags that tell a sweep's runs apart: dataset, phase, the method and pair as kd.report names them, the models,
    and the conf/loss option (`choices`: Hydra's runtime choices), then logger.tags. A teacher run is `method:teacher
    (CE)`, without the student's pair, model and loss."""
    config, phase = plain_config(cfg), Phase(cfg.phase)
    tags = [f"dataset:{cfg.dataset.name}", f"phase:{phase.value}", f"method:{method_name(config)}",
            f"teacher:{model_name(cfg.teacher)}"]
    if phase is Phase.student:
        tags += [f"pair:{pair_label(config)}", f"student:{model_name(cfg.student)}"]
        if (choices or {}).get("loss"):
            tags.append(f"loss:{choices['loss']}")
    return [shortened(tag, TAG_MAX_CHARS) for tag in tags] + list(cfg.logger.tags)


def shortened(text: str, limit: int) -> str:
    """`text`, or when longer than `limit` its head and a hash of the whole, so that distinct texts stay distinct."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 9]}~{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def run_name(cfg: DictConfig, out_dir: Path) -> str:
    """logger.name, else `<method> <pair> s<seed>` (a teacher run: `teacher (CE) <model> s<seed>`), and for a job of a
    Hydra sweep the other keys the sweep varies, from its folder's name: `KD resnet56 -> resnet20 s1 loss.alpha=0.9`."""
    if cfg.logger.name:
        return cfg.logger.name
    config = plain_config(cfg)
    models = pair_label(config) if Phase(cfg.phase) is Phase.student else model_label(config["teacher"])
    swept = [part for part in out_dir.name.split(",") if part != f"seed={cfg.seed}"] if in_sweep(out_dir) else []
    return " ".join([method_name(config), models, f"s{cfg.seed}", *([",".join(swept)] if swept else [])])


def in_sweep(out_dir: Path) -> bool:
    """Whether out_dir is a job folder of a Hydra sweep (kd.sweep.SweepChecks writes sweep.json before any job)."""
    return (out_dir.parent / "sweep.json").is_file()


def agent_run_id() -> Optional[str]:
    """The run id W&B's sweep agent started this process for, or None outside an agent."""
    return os.environ.get(AGENT_RUN_ID) if os.environ.get(AGENT_SWEEP_ID) else None


def new_run_id() -> str:
    """A W&B run id, chosen when a run folder is first used and kept in its run.json: every process that works in
    the folder (a resume, a rerun after a kill) logs into this one W&B run. Under W&B's sweep agent, the agent's."""
    return agent_run_id() or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start(
    cfg: DictConfig, out_dir: Path, run_id: str, extra: Optional[dict[str, Any]] = None,
    choices: Optional[Mapping[str, Any]] = None,
):
    """Start (or continue) the folder's W&B run `run_id`; mode from logger.mode, which defaults to $WANDB_MODE, then
    offline. `extra` joins the config (the teacher's facts: a student run uses its teacher's artifact); `choices`:
    Hydra's runtime choices (the loss option's name tags the run).

    An online start that fails (no credentials, no network: bounded by logger.init_timeout_s) warns once and
    logs offline instead, so a W&B outage never costs a training run.
    """
    args = init_args(cfg, out_dir, run_id, extra, choices)
    if not distributed.is_main():  # under torchrun, rank 0 alone logs
        return _init(cfg, "disabled", args)
    try:
        run = _init(cfg, cfg.logger.mode, args)
    except Exception as error:  # wandb raises UsageError, CommError, or its own timeouts
        if cfg.logger.mode != "online":
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        log.warning(
            "W&B online start failed (%s: %s); logging offline instead (raise logger.init_timeout_s=%g if the network "
            "is just slow). Upload later with `wandb sync %s/wandb/offline-run-*`.",
            type(error).__name__, reason, cfg.logger.init_timeout_s, out_dir,
        )
        wandb.teardown()  # the failed start keeps the run id registered in W&B's service process: end it first
        run = _init(cfg, "offline", args)
    announce(run, out_dir)
    use_teacher(run, cfg, extra or {})
    return run


@contextmanager
def tracked(
    cfg: DictConfig, out_dir: Path, run_id: str, extra: Optional[dict[str, Any]] = None,
    choices: Optional[Mapping[str, Any]] = None,
) -> Iterator[Any]:
    """start()'s run for the block, finished when it ends: with exit code 1 when it raised, as the next job of a
    multirun would otherwise log into it."""
    run = start(cfg, out_dir, run_id, extra, choices)
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


def init_args(
    cfg: DictConfig, out_dir: Path, run_id: str, extra: Optional[dict[str, Any]], choices: Optional[Mapping[str, Any]]
) -> dict[str, Any]:
    """wandb.init's arguments but the mode and settings. Under W&B's sweep agent: the agent's run id, project and
    entity (W&B would take them over ours anyway), so the sweep sees its run and run.json names the run W&B has."""
    agent_id = agent_run_id()
    if agent_id is not None and agent_id != run_id:
        log.warning("%s/run.json names W&B run %s, but W&B's sweep agent started this process for run %s: logging "
                    "there", out_dir, run_id, agent_id)
    return dict(
        dir=str(out_dir),
        id=agent_id or run_id,
        resume="allow",  # the same W&B run continues when a run folder resumes
        project=(os.environ.get("WANDB_PROJECT") if agent_id else None) or cfg.logger.project,
        entity=(os.environ.get("WANDB_ENTITY") if agent_id else None) or cfg.logger.entity,
        group=cfg.logger.group,
        name=run_name(cfg, out_dir),
        job_type=Phase(cfg.phase).value,
        tags=run_tags(cfg, choices),
        config={**plain_config(cfg), **(extra or {})},
    )


def _init(cfg: DictConfig, mode: str, args: dict[str, Any]):
    # silent: W&B's banners were most of a sweep's console output (announce says where the run is instead). New
    # Settings and copies of the arguments per call: wandb.init writes into what it is given, and a failed online
    # start is tried again offline.
    settings = wandb.Settings(console="off", silent=True, init_timeout=cfg.logger.init_timeout_s)
    # create_new: runs of one process are independent (a fused group's members log at once, kd.fused).
    return wandb.init(mode=mode, settings=settings, reinit="create_new", **copy.deepcopy(args))


def announce(run, out_dir: Path) -> None:
    """One line for W&B's banners: an online run's address; where an offline run is and how to upload it, for the
    jobs of a Hydra sweep once per sweep (and process)."""
    if run.disabled:
        return
    if not run.offline:
        log.info("W&B run %r: %s", run.name, run.url)
        return
    sweep = out_dir.parent if in_sweep(out_dir) else None
    if sweep is None:
        log.info("W&B offline run %r: upload it with `wandb sync %s/wandb/offline-run-*`", run.name, out_dir)
    elif sweep not in _hinted_sweeps:
        _hinted_sweeps.add(sweep)
        log.info("W&B offline runs, one per job: upload the sweep's with `wandb sync %s/*/wandb/offline-run-*`", sweep)


def teacher_artifact(path: Path, sha256: str, source: str, label: str) -> "wandb.Artifact":
    """A teacher's weights as a W&B model artifact: a reference to the file, not a copy (a teacher can be 100s of
    MB), named by its store entry, or for a teacher from elsewhere by its model and sha256. Every run that cites the
    same file builds the same artifact (W&B's digest covers the reference's checksum), so W&B links them to one."""
    path = Path(path).resolve()
    metadata = {"sha256": sha256, "source": source, "path": str(path)}
    if source == "store":  # <teacher_store>/<entry>/<version>/teacher.pt
        name, metadata["store_version"] = path.parent.parent.name, path.parent.name
    else:
        name = f"teacher-{label}-{sha256[:12]}"
    name = shortened(re.sub(r"[^A-Za-z0-9_.-]", "-", name), ARTIFACT_NAME_MAX_CHARS)
    artifact = wandb.Artifact(name, type="model", metadata=metadata)
    artifact.add_reference(path.as_uri(), name=path.name)
    return artifact


def log_teacher(run, checkpoint: Path) -> None:
    """Log a teacher just filed in the store as its run's output artifact (the students' runs use it)."""
    if run.disabled:
        return
    sha256 = teachers.read_manifest(checkpoint.parent)["sha256"]
    run.log_artifact(teacher_artifact(checkpoint, sha256, "store", ""))


def use_teacher(run, cfg: DictConfig, facts: Mapping[str, Any]) -> None:
    """Declare a student run's teacher (`facts`: the student's teacher facts) as its input artifact. Offline, W&B's
    use_artifact refuses to run: the record it would write (this artifact, to be used once committed) is written
    directly, and `wandb sync` links the run to it. A W&B problem here never stops the training run."""
    if run.disabled or not facts.get("teacher_checkpoint"):
        return
    label = model_label(plain_config(cfg.teacher))
    artifact = teacher_artifact(facts["teacher_checkpoint"], facts["teacher/sha256"], facts["teacher/source"], label)
    try:
        if run.offline:
            run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
        else:
            run.use_artifact(artifact)
    except Exception as error:  # noqa: BLE001 (W&B's own errors vary)
        log.warning("W&B: could not link this run to its teacher's artifact %s (%s: %s)", artifact.name,
                    type(error).__name__, error)


def log_history(run, metrics_file: Path) -> None:
    """Log the epochs of metrics.jsonl that this W&B run has not got. A resumed offline run is a new segment (a
    folder of its own, which a sync of one folder would upload alone): it gets every epoch before the checkpoint
    again, so its newest segment holds the whole history. An online run resumed on W&B's server starts after its
    last logged step, and logs none again."""
    if run.disabled or not metrics_file.is_file():
        return
    for line in metrics_file.read_text().splitlines():
        metrics = json.loads(line)
        if metrics["epoch"] >= run.starting_step:
            run.log(metrics, step=metrics["epoch"])
