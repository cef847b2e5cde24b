"""The run's lifecycle: `run(cfg, out_dir)` trains the teacher or the student that `cfg.phase` names, around the loop
of kd.loop, and writes its records.

Flow: check the config -> hold the run folder's lock -> return its result.json if this run finished there (or, for a
teacher phase, the stored teacher of this identity trained on these images), or resume from its last.pt ->
(student) find, load and check the teacher -> load data, build the models -> only now write run.json and start
train.log and W&B (a refused run changes nothing on disk) -> train epoch by epoch, evaluating after each ->
(teacher) file it in the store -> run_info.json, then result.json (the commit point).

A resumed run goes on with the teacher and the training images its last.pt was trained with: last.pt records the
teacher's sha256 and path and the training data's digest, and a resume that would use others is refused.

What the lifecycle calls lives beside it: the config's checks in kd.config, device and precision in kd.hardware, the
teacher's checks in kd.teacher_checks, the store in kd.teachers, atomic writes and the folder lock in kd.fileio.
"""
import copy
import logging
import time
from contextlib import ExitStack, contextmanager
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd import (
    cpu_conv,
    distributed,
    feedback,
    fileio,
    hardware,
    profiling,
    records,
    stages,
    teacher_checks,
    teachers,
    tracking,
)
from kd.checkpoints import TeacherFile
from kd.config import Phase, check_config
from kd.data import FileSplits, Splits, hold_out
from kd.datapath import DataPath, InMemoryData
from kd.loop import Job, run_epoch, training_forward
from kd.methods.base import CELoss, Criterion
from kd.streaming import StreamingData
from kd.teacher_cache import TeacherCache, model_code

log = logging.getLogger(__name__)

# What last.pt must hold to resume a run exactly.
RESUME_KEYS = ("model", "criterion", "optimizer", "scheduler", "scaler", "epoch", "metrics", "best", "rng", "config")
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's


def run(
    cfg: DictConfig, out_dir: Path, overrides: Sequence[str] = (), file_into: Optional[Path] = None,
    resume_with: str = "", choices: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Train the phase's model, write the run's records into out_dir; return its result.

    Re-running into the same out_dir resumes from its last.pt, or returns its result.json when it finished. One
    process at a time may use out_dir (its lock). Under torchrun every rank trains its share of each batch; rank 0
    alone holds the lock, logs and writes. `file_into`: the store version folder an on-demand teacher is filed in.
    `resume_with`: the command that resumes this run, logged once its checks have passed. `choices`: Hydra's runtime
    choices of the config groups (the loss option's name tags the W&B run).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    check_recipe_overrides(cfg, overrides)
    cfg = phase_config(cfg)
    check_config(cfg)
    with run_folder(out_dir) as unwritable, run_log(out_dir) as commit_log:
        finished, checkpoint, record = previous_run(cfg, out_dir)
        if finished is not None:
            log.info("%s already holds this run's result.json: returning it without training again", out_dir)
            return finished
        if unwritable is not None:  # read-only or full: refused before any work, as all that follows writes there
            raise unwritable
        data = None  # loaded here only when a stored teacher's training data must be compared with it
        if Phase(cfg.phase) is Phase.teacher and not cfg.retrain_teacher:
            stored, data = stored_teacher_result(cfg, out_dir, overrides, record)
            if stored is not None:
                if (out_dir / "run.json").is_file():
                    commit_log()
                return stored
        if Phase(cfg.phase) is Phase.teacher and distributed.is_main():
            teachers.check_writable(Path(cfg.teacher_store))
        job, facts, info = set_up(cfg, overrides, checkpoint, data)
        # Every check has passed: from here on the run writes into its folder.
        record = distributed.broadcast_object(record or start_record(cfg, out_dir, overrides))
        commit_log()
        log.info(feedback.start_line(cfg, job, hardware.precision_name(job.amp_dtype), out_dir))
        if resume_with:
            log.info("resume with: %s", resume_with)
        if checkpoint is not None:
            restore(job, checkpoint)
        teacher_facts = {k: v for k, v in facts.items() if k.startswith("teacher")}
        with tracking.tracked(cfg, out_dir, record["wandb_id"], teacher_facts, choices) as tracker:
            result, info = train(job, cfg, out_dir, tracker, checkpoint, facts, info)
            if Phase(cfg.phase) is Phase.teacher and distributed.is_main():
                checkpoint_path = teachers.save_to_store(cfg, job.model, result, out_dir, job.data, file_into)
                result["teacher_checkpoint"] = str(checkpoint_path)
                tracking.log_teacher(tracker, checkpoint_path)  # the students' runs use it
        if not distributed.is_main():
            return result
        info.update(wall_time_s=time.perf_counter() - started, env=records.environment(job.data.device))
        info["resumed_from_epoch"] = checkpoint["epoch"] if checkpoint else None
        result.update(world_size=distributed.world_size(), config=records.plain_config(cfg))
        fileio.write_json(out_dir / "run_info.json", info)
        fileio.write_json(out_dir / "result.json", result)  # the commit point: the run is finished
        return result


# ---------------------------------------------------------------------------------------------------------------
# checks before any work: the phase's config


def check_recipe_overrides(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a teacher-phase command line that sets the student's recipe, which that phase would ignore."""
    if Phase(cfg.phase) is not Phase.teacher or teachers.shared_recipe(cfg):
        return
    ignored = [o for o in overrides if teachers.override_head(o) in teachers.RECIPE_KEYS]
    if ignored:
        raise ValueError(
            f"phase=teacher trains with teacher_recipe, and {' '.join(ignored)} set the student's recipe (the "
            "top-level epochs, batch_size, optimizer, scheduler). Set the teacher's as teacher_recipe.epochs=..., "
            "teacher_recipe.optimizer.lr=..., optimizer@teacher_recipe.optimizer=adamw, or add teacher_recipe=student "
            "to train both phases with the top-level recipe."
        )


def phase_config(cfg: DictConfig) -> DictConfig:
    """The config as the phase runs it: the teacher phase trains with teacher_recipe, which replaces the top-level
    recipe (the student's), so a teacher run's records show the recipe that trained it."""
    if Phase(cfg.phase) is not Phase.teacher:
        return cfg
    recipe = OmegaConf.to_container(cfg.teacher_recipe, resolve=True)
    cfg = copy.deepcopy(cfg)
    for key in teachers.RECIPE_KEYS:
        cfg[key] = recipe[key]
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# the run folder: its lock and its log


@contextmanager
def run_folder(out_dir: Path) -> Iterator[Optional[fileio.CannotWrite]]:
    """Rank 0 holds out_dir's lock for the run's life; every rank learns whether it got it. Yields the CannotWrite
    to raise before the first write when out_dir exists but cannot be written (fileio.folder_lock)."""
    with ExitStack() as stack:
        refusal, unwritable = None, None
        if distributed.is_main():
            try:
                unwritable = stack.enter_context(fileio.folder_lock(out_dir))
            except (fileio.FolderBusy, fileio.CannotWrite) as error:
                refusal = error
        refusal, unwritable = distributed.broadcast_object((refusal, unwritable))
        if refusal is not None:
            raise refusal
        yield unwritable


@contextmanager
def run_log(out_dir: Path) -> Iterator[Callable[[], None]]:
    """Log lines are held in memory until the run passes its checks; the yielded commit() then writes them, and
    every later line, to out_dir/train.log (rank 0). A refused run leaves no log line in the folder."""
    root = logging.getLogger()
    buffer = MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    root.addHandler(buffer)
    file_handler: list[logging.Handler] = []

    def commit() -> None:
        if distributed.is_main():
            handler = logging.FileHandler(out_dir / "train.log")
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            buffer.setTarget(handler)
            buffer.flush()
            root.addHandler(handler)
            file_handler.append(handler)
        root.removeHandler(buffer)

    try:
        yield commit
    finally:
        root.removeHandler(buffer)
        buffer.close()
        for handler in file_handler:
            root.removeHandler(handler)
            handler.close()


# ---------------------------------------------------------------------------------------------------------------
# what the folder holds already: a finished run, a last.pt to resume, or the store's teacher


def previous_run(cfg: DictConfig, out_dir: Path) -> tuple[Optional[dict], Optional[dict], Optional[dict]]:
    """(result, None, record) when out_dir holds this run finished, (None, last.pt, record) when interrupted after a
    checkpoint, (None, None, record or None) otherwise; a folder another config wrote is refused."""
    fix = f"Delete {out_dir} to start this run over, or give the run another folder (hydra.run.dir=...)."
    record = fileio.read_json(out_dir / "run.json", fix) if (out_dir / "run.json").is_file() else None
    if (out_dir / "result.json").is_file():
        if record is not None:
            check_same_config(cfg, _recorded_config(record, out_dir / "run.json", fix), out_dir / "run.json")
        result = fileio.read_json(out_dir / "result.json", fix)
        check_same_config(cfg, _recorded_config(result, out_dir / "result.json", fix), out_dir / "result.json")
        return result, None, record
    checkpoint = last_checkpoint(out_dir)
    # A last.pt that records its teacher's sha256 goes on with that teacher (set_up compares the sha256), however
    # teacher_checkpoint names it now: a path to a copy of it, or auto while the store still holds it.
    loose = ("teacher_checkpoint",) if checkpoint is not None and teacher_named_freely(checkpoint) else ()
    if record is not None:
        recorded = _recorded_config(record, out_dir / "run.json", fix)
        check_same_config(cfg, recorded, out_dir / "run.json", also_ignored=loose)
    if checkpoint is None:
        return None, None, record
    check_same_config(cfg, checkpoint["config"], checkpoint["path"], also_ignored=loose)
    log.info("resuming %s after epoch %d of %d", out_dir, checkpoint["epoch"], cfg.epochs)
    return None, checkpoint, record


def last_checkpoint(out_dir: Path) -> Optional[dict[str, Any]]:
    """out_dir's last.pt, with its own path under "path"; None when there is none; an unusable one is refused."""
    last = out_dir / "last.pt"
    if not last.is_file():
        return None
    try:
        checkpoint = fileio.load_checkpoint(last, RESUME_KEYS)
    except fileio.UnusableCheckpoint as error:
        raise fileio.UnusableCheckpoint(
            f"cannot resume: {error} Delete it to start this run over in {out_dir}, or pick another hydra.run.dir."
        ) from None
    return {**checkpoint, "path": last}


def teacher_named_freely(checkpoint: dict[str, Any]) -> bool:
    """Whether a resume may set teacher_checkpoint otherwise than last.pt's config: when last.pt records its teacher's
    sha256 (the teacher is then compared by content), or when last.pt, written before runs recorded it, looked its
    teacher up in the store (its train.log names the version: the fix of an ambiguous store, see first_teacher)."""
    if "train_digest" in checkpoint:
        return checkpoint.get("teacher_sha256") is not None
    return checkpoint["config"].get("teacher_checkpoint") == "auto"


def _recorded_config(record: dict[str, Any], path: Path, fix: str) -> dict[str, Any]:
    if not isinstance(record.get("config"), dict):
        raise fileio.CorruptRecord(f"{path} is damaged (it holds no config). {fix}")
    return record["config"]


def check_same_config(
    cfg: DictConfig, recorded: dict[str, Any], source: Path, fix: str = "", also_ignored: tuple[str, ...] = ()
) -> None:
    """Refuse to resume or reuse what another config wrote, naming the keys that differ (but `also_ignored`)."""
    ignored = records.RESULT_NEUTRAL + (records.TEACHER_PHASE_NEUTRAL if Phase(cfg.phase) is Phase.teacher else ())
    ignored += also_ignored
    differences = records.config_differences(recorded, records.plain_config(cfg), ignored)
    if differences:
        raise ValueError(
            f"{source} was written by another config (recorded -> now: {'; '.join(differences)}). "
            + (fix or "Use another run folder (hydra.run.dir / hydra.sweep.dir), or delete that one to start over.")
        )


def stored_teacher_result(
    cfg: DictConfig, out_dir: Path, overrides: Sequence[str], record: Optional[dict]
) -> tuple[Optional[dict[str, Any]], Optional[DataPath]]:
    """A teacher phase whose identity the store holds, trained on these very images, returns that teacher without
    training (the store is immutable); a fresh run folder gets its run.json and result.json, naming the stored
    checkpoint. Returns (that result or None, the data when it was loaded to compare its digest, for set_up)."""
    entry = teachers.entry_dir(cfg, cfg.seed)
    if teachers.newest_complete(entry) is None:
        return None, None  # nothing stored to compare with: set_up loads the data
    device = hardware.resolve_device(cfg.device)
    data = load_data(cfg.dataset, device, hardware.use_channels_last(cfg.channels_last, device))
    path = teachers.stored_teacher(cfg, data.train_digest())
    if path is None:
        log.info("the store's teachers in %s were trained on other images than these: training one on these images "
                 "(a new version beside them)", entry)
        return None, data
    manifest = teachers.read_manifest(path.parent)
    fix = (f"The store holds this teacher ({path}), trained with those values. Drop the differing overrides to use "
           "it, or set retrain_teacher=true to train a new version beside it.")
    check_same_config(cfg, manifest["config"], path.parent / "manifest.json", fix)
    result = {**manifest["result"], "teacher_checkpoint": str(path), "config": manifest["config"]}
    log.info("the store holds this teacher: %s (test/acc1 %.2f), trained in %s; returning it without training "
             "(retrain_teacher=true trains a new version)", path, result["test/acc1"], manifest["run_dir"])
    if record is None and not (out_dir / "last.pt").exists() and distributed.is_main():
        start_record(cfg, out_dir, overrides)
        fileio.write_json(out_dir / "result.json", result)
    return result, None


# ---------------------------------------------------------------------------------------------------------------
# set up: the teacher, the data, the job


def set_up(
    cfg: DictConfig, overrides: Sequence[str], resumed: Optional[dict] = None, data: Optional[DataPath] = None
) -> tuple[Job, dict[str, Any], dict[str, Any]]:
    """Everything before the first epoch, cheapest checks first: criterion, teacher, data, model; returns the job,
    the run's facts (part of result.json) and what varies between executions (speed: run_info.json). `resumed`: the
    last.pt the run goes on from (it keeps that one's teacher, training data and precision); `data`: already loaded."""
    phase = Phase(cfg.phase)
    hardware.configure_determinism(cfg.deterministic)
    device = hardware.resolve_device(cfg.device)
    criterion = instantiate(cfg.loss) if phase is Phase.student else CELoss()  # the loss checks its values
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    required = wants_teacher(cfg, stages.needs_teacher(criterion))
    teacher_path = first_teacher(cfg, required, overrides, resumed) if phase is Phase.student else None
    teacher_file = None  # read and checked before any data is decoded
    if teacher_path is not None:
        teacher_file = teachers.read(teacher_path, cfg.teacher, cfg.teacher_checkpoint_key)
    if data is None:
        data = load_data(cfg.dataset, device, hardware.use_channels_last(cfg.channels_last, device))
    # last.pt records it: on every rank now, not on rank 0 alone after epoch 1 (a streamed folder's takes minutes)
    data.train_digest()
    check_resumed_data(cfg, resumed, data)
    if teacher_path is not None and resumed is None and teachers.from_store(cfg):
        teacher_path, teacher_file = teacher_for_data(cfg, required, overrides, data, (teacher_path, teacher_file))
    teacher = teachers.build(teacher_file, cfg.teacher, data.device) if teacher_file is not None else None
    job = build_job(cfg, phase, criterion, data, device, teacher, resumed.get("precision") if resumed else None)
    facts = {"phase": phase.value, "params": profiling.count_parameters(job.model)}
    facts["adapter_params"] = profiling.count_parameters(job.criterion)
    image_shape = data.image_shape
    facts["flops_per_image"] = profiling.forward_flops(job.model, image_shape, device)
    info = profiling.profile_model(job.model, image_shape, cfg.batch_size, device, job.amp_dtype) if cfg.profile else {}
    if teacher is not None:
        facts.update(teacher_checks.check_teacher(job, cfg, teacher_path, teacher_file))
        job.cache = open_teacher_cache(cfg, job, facts["teacher/sha256"])
    return job, facts, info


def wants_teacher(cfg: DictConfig, loss_needs_it: bool) -> bool:
    """Whether a student run must have its teacher: when its loss reads it, and with train_missing_teacher=true also
    when it does not (a baseline), so that every row of a table records its pair's teacher and agreement with it."""
    return loss_needs_it or (cfg.train_missing_teacher and cfg.teacher_checkpoint == "auto")


def first_teacher(
    cfg: DictConfig, required: bool, overrides: Sequence[str], resumed: Optional[dict]
) -> Optional[Path]:
    """The student's teacher as far as it is known before the data is decoded: a resumed run's is the one its
    last.pt records (resumed_teacher); otherwise the config's (teacher_for_data may still take another version)."""
    if resumed is not None and "train_digest" in resumed:
        return teacher_checks.resumed_teacher(cfg, required, overrides, resumed)
    path = find_or_train_teacher(cfg, required, overrides)
    if resumed is not None and path is not None and teachers.from_store(cfg):
        teacher_checks.check_unrecorded_teacher(resumed["path"], path.parent.parent)
    return path


def find_or_train_teacher(
    cfg: DictConfig, required: bool, overrides: Sequence[str], train_digest: Optional[str] = None
) -> Optional[Path]:
    """The student's teacher checkpoint (from the store: trained on the data of `train_digest`, when given); with
    train_missing_teacher=true a missing one is trained first, once."""
    try:
        return teachers.resolve(cfg, required, list(overrides), train_digest)
    except teachers.MissingTeacher as missing:
        if not cfg.train_missing_teacher:
            raise
        if distributed.world_size() > 1:  # rank 0 would hold the lock while the others wait on it
            raise ValueError(f"{missing}\ntrain_missing_teacher=true does not work under torchrun: train the teacher "
                             "first (phase=teacher, under torchrun too if you like).") from None
        teachers.check_writable(Path(cfg.teacher_store))
        with teachers.store_lock(missing.entry, cfg.teacher_lock_timeout_s):
            # a parallel job may have filed it meanwhile
            version = (teachers.newest_complete(missing.entry) if train_digest is None
                       else teachers.version_for_data(missing.entry, train_digest))
            if version is None:
                version = teachers.pending_version(missing.entry, with_run=True)
                log.info("training the missing teacher into %s", version)
                run(teachers.teacher_config(cfg), version / "run", file_into=version)
        return version / "teacher.pt"


def teacher_for_data(
    cfg: DictConfig, required: bool, overrides: Sequence[str], data: DataPath, found: tuple[Path, TeacherFile]
) -> tuple[Optional[Path], Optional[TeacherFile]]:
    """The store's teacher for these very images, now that their digest is known: the lookup before decoding knew
    only the config, and its version may have been trained on other images (then this one, trained on demand with
    train_missing_teacher=true, or refused with the command that trains it)."""
    path = find_or_train_teacher(cfg, required, overrides, data.train_digest())
    if path == found[0]:
        return found
    log.info("teacher %s: trained on these training images (the store's newest version, %s, on other images)",
             path, found[0])
    return path, teachers.read(path, cfg.teacher) if path is not None else None


def check_resumed_data(cfg: DictConfig, resumed: Optional[dict], data: DataPath) -> None:
    """A resumed run goes on with the training images its last.pt was trained on: others (another digest: images
    added, removed or replaced) are refused, naming the folder. A last.pt of an earlier version records no digest."""
    if resumed is None:
        return
    if "train_digest" not in resumed:
        log.warning("%s records neither its teacher's sha256 nor its training images' digest (an earlier version of "
                    "this repository wrote it): resuming without checking that they are the same", resumed["path"])
        return
    recorded, now = resumed["train_digest"], data.train_digest()
    if now != recorded:
        folder = cfg.dataset.source.get("root") or f"dataset={cfg.dataset.name}"
        raise ValueError(
            f"cannot resume {resumed['path']}: the training images in {folder} are not those it was trained on "
            f"(digest {recorded[:12]} when trained, {now[:12]} now: images added, removed or replaced). A resumed run "
            "keeps its data: put those images back, or start over in a new run folder (hydra.run.dir=...)."
        )


def load_data(dataset_cfg: DictConfig, device: torch.device, channels_last: bool = False) -> DataPath:
    """Read the dataset's source, hold out the validation split, check what needs the images. Decoded splits move to
    the device (InMemoryData); file lists (ImageNet, large image folders) are decoded per epoch (StreamingData)."""
    source = read_source(dataset_cfg.source)
    if len(source.classes) != dataset_cfg.num_classes:
        raise ValueError(
            f"dataset.num_classes={dataset_cfg.num_classes} but the data has {len(source.classes)} classes: "
            f"set dataset.num_classes={len(source.classes)}."
        )
    train, val = hold_out(source.train, dataset_cfg.val_fraction, dataset_cfg.split_seed)
    if len(train) == 0:
        raise ValueError(f"dataset.val_fraction={dataset_cfg.val_fraction} leaves no training image of "
                         f"{len(source.train)}: lower it.")
    streamed = isinstance(source, FileSplits)
    size = source.image_size if streamed else min(source.train.images.shape[2:])
    if dataset_cfg.crop_padding > size and not (streamed and source.recipe == "resized_crop"):
        raise ValueError(f"dataset.crop_padding={dataset_cfg.crop_padding} is larger than the {size}-pixel images: "
                         f"a crop could hold no pixel of the image. Use at most {size} (4 is the CIFAR standard).")
    stats = [torch.tensor(list(v), device=device).view(1, -1, 1, 1) for v in (dataset_cfg.mean, dataset_cfg.std)]
    if streamed:
        augmentation = (dataset_cfg.crop_padding, dataset_cfg.hflip)
        return StreamingData.from_files(source, train, val, *stats, augmentation, channels_last)
    return InMemoryData(
        train.to(device), val.to(device) if val is not None else None, source.test.to(device),
        *stats, dataset_cfg.crop_padding, dataset_cfg.hflip, channels_last, list(source.classes),
    )


def read_source(source_cfg: DictConfig) -> "Splits | FileSplits":
    """The dataset source's splits. Its own errors (ValueError, OSError: they name the file and the fix) are raised
    as they are, not inside Hydra's InstantiationException, whose repr of them puts a listing on one line."""
    try:
        return instantiate(source_cfg)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, OSError)):
            raise error.__cause__ from None
        raise


def build_job(
    cfg: DictConfig, phase: Phase, criterion: Criterion, data: DataPath, device: torch.device,
    teacher: Optional[nn.Module] = None, resumed_precision: Optional[str] = None,
) -> Job:
    """The one place a Job is built (set_up, tools/ and the tests call it): freeze the teacher, trained or freshly
    built (teacher_checks.freeze_teacher), seed, build the trained model, bind the criterion to both models (its
    adapters), optimizer, schedule, precision (a resumed run's: the one its last.pt was trained in; fp32 without TF32)
    and the forward the training step calls."""
    if teacher is not None:
        teacher = teacher_checks.freeze_teacher(teacher, data)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.student if phase is Phase.student else cfg.teacher)
    model = cpu_conv.prepare(model.to(device, memory_format=hardware.memory_format(data)), device.type,
                             data.channels_last)
    criterion.bind(model, teacher, data.sample_inputs(2), data.train_labels)
    criterion.to(device)
    # Adapters (regressors, embeddings) train with the student, under the same optimizer settings.
    optimizer = instantiate(cfg.optimizer)([*model.parameters(), *criterion.parameters()])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    progress = cfg.progress_bar if cfg.progress_bar is not None else _stderr_is_terminal()
    amp_dtype = hardware.job_precision(cfg.precision, device, resumed_precision)
    hardware.set_tf32(amp_dtype)
    job = Job(
        model, teacher, criterion, optimizer, scheduler, data, cfg.seed, cfg.batch_size, cfg.eval_batch_size,
        progress, amp_dtype=amp_dtype, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
    )
    job.forward = training_forward(job, cfg.compile_mode if cfg.compile else None)
    if not progress and cfg.progress_every_s is not None:  # a log file, not a terminal: plain lines instead of a bar
        job.progress = feedback.Progress(cfg.progress_every_s, cfg.epochs)
    return job


def _stderr_is_terminal() -> bool:
    import sys

    return sys.stderr.isatty()


def open_teacher_cache(cfg: DictConfig, job: Job, teacher_sha256: str) -> Optional[TeacherCache]:
    """The cache entry for this teacher, training data, views and numerics; None when the cache cannot serve the run."""
    if not cfg.teacher_cache or not job.criterion.needs_teacher:
        return None
    if job.criterion.layers()[1]:
        log.info("teacher cache off: the loss reads the teacher's features, and only logits are cached")
        return None
    if distributed.world_size() > 1:
        log.info("teacher cache off: not used under torchrun (each rank runs the teacher on its share)")
        return None
    views = {k: v for k, v in records.plain_config(cfg.dataset).items() if k not in ("source", "name")}
    key = {
        "teacher_sha256": teacher_sha256, "teacher": records.plain_config(cfg.teacher),
        # the code of the teacher's own model (its classes' and factory's files, its libraries' versions)
        "model_code": model_code(job.teacher, cfg.teacher._target_),
        # which views, in which order: the training split's content, its augmentation, the order's seed
        "train_data_sha256": job.data.train_digest(), "views": views, "seed": cfg.seed, "batch_size": cfg.batch_size,
        # the numerics of the teacher pass:
        "precision": str(job.amp_dtype), "channels_last": job.data.channels_last, "batchnorm_folded": True,
        "device": job.data.device.type, "torch": torch.__version__,
    }
    if job.amp_dtype is None and job.data.device.type == "cuda":  # an fp32 run on a GPU: without TF32 since set_tf32,
        key["cudnn_tf32"] = torch.backends.cudnn.allow_tf32  # so entries of earlier code (TF32 convolutions) are apart
    root = Path(cfg.teacher_cache_dir) if cfg.teacher_cache_dir else Path(cfg.teacher_store).parent / "teacher_cache"
    shape = (job.data.num_train, cfg.dataset.num_classes)
    return TeacherCache(root, key, shape, cfg.teacher_cache_dtype, cfg.teacher_cache_max_gb * 1e9,
                        cfg.teacher_cache_topk)


# ---------------------------------------------------------------------------------------------------------------
# training and its records


def start_record(cfg: DictConfig, out_dir: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """run.json: the run's own record (overrides, resolved config, the keys tied to the seed, its W&B id), written
    once, by the run that passed its checks; kd.report lists a sweep's jobs from it."""
    unresolved = records.flatten(OmegaConf.to_container(cfg, resolve=False))
    record = {"overrides": list(overrides), "config": records.plain_config(cfg), "wandb_id": tracking.new_run_id(),
              "seed_linked": sorted(k for k, v in unresolved.items() if v == "${seed}")}
    if distributed.is_main():
        fileio.write_json(out_dir / "run.json", record)
    return record


def restore(job: Job, checkpoint: dict[str, Any]) -> None:
    """Put the model, optimizer, schedule and global RNG back as they were when last.pt was written."""
    job.model.load_state_dict(checkpoint["model"])
    job.criterion.load_state_dict(checkpoint["criterion"])  # adapters (FitNet regressor, CRD embeddings, memory)
    job.optimizer.load_state_dict(checkpoint["optimizer"])
    job.scaler.load_state_dict(checkpoint["scaler"])
    job.scheduler.load_state_dict(checkpoint["scheduler"])
    # Batches come from epoch_generator; the global RNG matters only to models with dropout.
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, state in enumerate(checkpoint["rng"]["cuda"][:visible]):
        torch.cuda.set_rng_state(state, index)


def train(
    job: Job, cfg: DictConfig, out_dir: Path, tracker, checkpoint: Optional[dict], facts: dict[str, Any],
    info: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epochs, logged to the folder's W&B run `tracker` (its id is in run.json); returns (result, info)."""
    tracker.summary.update({**facts, **info})
    teacher = {"teacher_sha256": facts.get("teacher/sha256"), "teacher_checkpoint": facts.get("teacher_checkpoint")}
    result = {**facts, **fit(job, cfg, out_dir, tracker, checkpoint, teacher)}
    if job.cache is not None:
        info.update(teacher_cache_summary(job.cache))
    tracker.summary.update({**result, **info})
    return result, info


def fit(
    job: Job, cfg: DictConfig, out_dir: Path, tracker, checkpoint: Optional[dict] = None,
    teacher: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The epoch loop: train, step the schedule, evaluate, record; keep last.pt and best.pt; resume after last.pt.
    `teacher`: its teacher_sha256 and teacher_checkpoint, which each checkpoint records (None without a teacher)."""
    best_key = "val/acc1" if "val" in job.data.splits else "test/acc1"
    metrics_file = out_dir / "metrics.jsonl"
    done = checkpoint["epoch"] if checkpoint else 0
    metrics, best = (checkpoint["metrics"], checkpoint["best"]) if checkpoint else (None, None)
    main = distributed.is_main()
    if main:
        fileio.keep_epochs(metrics_file, done)  # drop lines an interrupted run wrote after its last checkpoint
        tracking.log_history(tracker, metrics_file)  # a resumed run's new W&B segment gets the epochs before it
    before_epoch_1 = lambda: checkpoint_payload(job, cfg, None, None, teacher or {})  # noqa: E731
    stages.run_init_stage(job, cfg, out_dir, checkpoint, before_epoch_1)
    for epoch in range(done + 1, cfg.epochs + 1):
        metrics = run_epoch(job, epoch)
        best = metrics if best is None or metrics[best_key] > best[best_key] else best
        tracker.log(metrics, step=epoch)
        log.info(epoch_line(metrics, cfg.epochs))
        if main:
            fileio.append_jsonl(metrics_file, metrics)
            save_checkpoints(job, cfg, out_dir, metrics, best, teacher or {})
    return summarize(metrics, best, best_key)


def save_checkpoints(
    job: Job, cfg: DictConfig, out_dir: Path, metrics: dict[str, Any], best: dict[str, Any], teacher: dict[str, Any]
) -> None:
    """best.pt when this epoch is the best, then last.pt: everything an exact resume needs, written last."""
    payload = checkpoint_payload(job, cfg, metrics, best, teacher)
    if best is metrics:
        fileio.save_checkpoint(out_dir / "best.pt", payload)
    # last.pt is the epoch's commit point: once it lands, best.pt and metrics.jsonl are already up to date.
    fileio.save_checkpoint(out_dir / "last.pt", payload)


def checkpoint_payload(
    job: Job, cfg: DictConfig, metrics: Optional[dict[str, Any]], best: Optional[dict[str, Any]],
    teacher: dict[str, Any],
) -> dict[str, Any]:
    """What last.pt holds after the epoch of `metrics` (stage "main"), or before epoch 1 for metrics None (an init
    stage adds itself: kd.stages), with the inputs a resume must keep: the teacher's sha256 and path (`teacher`), the
    training data's digest."""
    model_cfg = cfg.student if Phase(cfg.phase) is Phase.student else cfg.teacher
    payload = teachers.checkpoint_payload(model_cfg, job.model, metrics, cfg)
    payload.update(teacher_sha256=teacher.get("teacher_sha256"), teacher_checkpoint=teacher.get("teacher_checkpoint"))
    payload["train_digest"] = job.data.train_digest()
    payload.update(criterion=job.criterion.state_dict(), optimizer=job.optimizer.state_dict(), classes=job.data.classes)
    payload["precision"] = hardware.precision_name(job.amp_dtype)  # a resume keeps it (job_precision)
    epoch = metrics["epoch"] if metrics is not None else 0
    payload.update(scheduler=job.scheduler.state_dict(), scaler=job.scaler.state_dict(), epoch=epoch, stage="main")
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    payload.update(best=best, rng={"cpu": torch.get_rng_state(), "cuda": cuda_rng})
    return payload


def summarize(last: dict[str, Any], best: dict[str, Any], best_key: str) -> dict[str, Any]:
    """Final metrics: the last epoch's, plus the test metrics at the epoch that `best_key` selects."""
    result = {k: v for k, v in last.items() if k.split("/")[0] in ("train", "val", "test")}
    result.update(epochs=last["epoch"], best_epoch=best["epoch"], best_selected_by=best_key)
    for key in ("test/acc1", "test/acc5", "val/acc1"):
        if key in best:
            result[f"{key}_best"] = best[key]
    return result


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {m['epoch']}/{epochs}", f"train loss {m['train/loss']:.4f} acc1 {m['train/acc1']:.2f}"]
    for split in ("val", "test"):
        if f"{split}/acc1" in m:
            part = f"{split} loss {m[f'{split}/loss']:.4f} acc1 {m[f'{split}/acc1']:.2f} acc5 {m[f'{split}/acc5']:.2f}"
            parts.append(part + (f" agree {m[f'{split}/agreement']:.2f}" if f"{split}/agreement" in m else ""))
    return " | ".join(parts + [f"lr {m['lr']:.4g}", f"{m['time/epoch_s']:.1f}s"])


def teacher_cache_summary(cache: TeacherCache) -> dict[str, Any]:
    return {"teacher_cache/hits": cache.hits, "teacher_cache/misses": cache.misses,
            "teacher_cache/rejected": cache.rejected, "teacher_cache/bytes": cache.size_bytes(),
            "teacher_cache/dir": str(cache.dir)}
