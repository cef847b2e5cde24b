"""The student's teacher, checked before a run trains against it: frozen as the student phase runs it, refused when
it was trained on other classes or scores here other than its file states, and cited by sha256; a resumed run's
teacher is the one its last.pt was trained with, or the resume is refused."""
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig
from torch import nn

from kd import fileio, pretrained, teachers
from kd.checkpoints import TeacherFile
from kd.datapath import DataPath
from kd.hardware import memory_format
from kd.loop import Job, predict, score

log = logging.getLogger(__name__)


def freeze_teacher(teacher: nn.Module, data: DataPath) -> nn.Module:
    """The teacher as the student phase runs it: on the data's device and memory format, eval mode, no gradients,
    each BatchNorm after a convolution folded into it (in eval mode it is an affine map). engine.build_job freezes
    every teacher here, a run's, tools/' and the tests', trained or freshly built, so all of them time and check the
    model a run uses."""
    teacher = teacher.to(data.device, memory_format=memory_format(data)).eval().requires_grad_(False)
    teachers.fold_batchnorm(teacher)
    return teacher


def check_teacher(job: Job, cfg: DictConfig, path: Path, teacher: TeacherFile) -> dict[str, Any]:
    """Refuse a teacher of other classes, measure it on this data, and compare with the accuracy its file states:
    a checkpoint of this repository that disagrees is refused, a published one is warned about. Returns the facts a
    student's records cite it by (measured accuracy, path, sha256, source, format)."""
    check_classes(teacher.classes, job.data.classes, path)
    measured = {}
    for split in sorted(job.data.splits, key=lambda name: name != "test"):  # test first: its figure is the record
        logits = predict(job.teacher, job.data, split, job.eval_batch_size, job.amp_dtype)
        measured[split] = score(logits, job.data.split_labels(split), None)
        job.teacher_predictions[split] = logits.argmax(1)
    accuracy, recorded = measured["test"]["acc1"], teacher.recorded_acc1
    if recorded is not None and abs(accuracy - recorded) > cfg.teacher_acc_tolerance:
        message = (f"teacher {path} scores {accuracy:.2f}% test top-1 here but {recorded:.2f}% "
                   f"{'when it was trained' if teacher.format == 'kd' else 'in its file'} (more than "
                   f"teacher_acc_tolerance={cfg.teacher_acc_tolerance}): wrong checkpoint, dataset or normalization.")
        if teacher.format == "kd":
            raise ValueError(message)
        log.warning("%s Going on: a published file's own figure may have been measured elsewhere.", message)
    log.info("teacher %s (%s): test top-1 %.2f (its file: %s)", path, teacher.format, accuracy,
             "none" if recorded is None else f"{recorded:.2f}")
    facts = {f"teacher/{name}/{key}": value for name, m in measured.items() for key, value in m.items()}
    facts.update({"teacher/acc1": accuracy, "teacher_checkpoint": str(path), "teacher/format": teacher.format,
                  "teacher/sha256": fileio.sha256_file(path), "teacher/source": teacher_source(cfg, path)})
    if recorded is not None:
        facts["teacher/recorded_acc1"] = recorded
    return facts


def teacher_source(cfg: DictConfig, path: Path) -> str:
    """Where a student's teacher came from: the store, a teachers_dir of published teachers, a library's cache
    (torchvision, timm), or a file by path."""
    if isinstance(path, pretrained.LibraryWeights):  # teacher_checkpoint=torchvision:<Weights> / timm:<name>
        return path.library
    if (path.parent / "manifest.json").is_file():
        return "store"
    return "teachers_dir" if cfg.teacher_checkpoint == "auto" and cfg.teachers_dir is not None else "file"


def check_classes(teacher_classes: Optional[list[str]], classes: list[str], path: Path) -> None:
    """Refuse a teacher trained on other classes, or on the same classes in another order (its outputs would be
    read under the wrong labels), even when its accuracy here looks plausible."""
    if teacher_classes is None or list(teacher_classes) == classes:
        return
    if sorted(teacher_classes) == sorted(classes):
        what = "the same classes in another order"
    else:
        extra, missing = sorted(set(teacher_classes) - set(classes)), sorted(set(classes) - set(teacher_classes))
        what = f"other classes (only the teacher's: {extra[:5]}, only this dataset's: {missing[:5]})"
    raise ValueError(f"teacher {path} was trained on {what} than this dataset: its label i is not this data's "
                     "label i. Use a teacher trained on this dataset.")


def resumed_teacher(cfg: DictConfig, required: bool, overrides: Sequence[str], resumed: dict) -> Optional[Path]:
    """The teacher a resumed run goes on with: the one its last.pt was trained with (by sha256), from the store even
    after a newer version was filed there, or from the file teacher_checkpoint names; any other is refused."""
    sha256 = resumed["teacher_sha256"]
    if sha256 is None:
        return None  # trained without a teacher (a baseline), it goes on without one
    if not teachers.from_store(cfg):
        now = teachers.resolve(cfg, required, list(overrides))
        now_sha256 = fileio.sha256_file(now) if now is not None else None
        if now_sha256 != sha256:
            raise ValueError(teacher_switch(resumed, now, now_sha256, ""))
        return now
    entry = teachers.entry_dir(cfg, cfg.teacher_seed)
    version, newest = teachers.version_with_sha256(entry, sha256), teachers.newest_complete(entry)
    if version is None:
        now = newest / "teacher.pt" if newest is not None else None
        now_sha256 = teachers.read_manifest(newest)["sha256"] if newest is not None else None
        raise ValueError(teacher_switch(resumed, now, now_sha256, f" (the store no longer holds it in {entry})"))
    if version != newest:
        log.info("resuming with %s, the teacher %s was trained with (sha256 %s): the store's newest version of it, %s, "
                 "serves new runs only", version, resumed["path"], sha256[:12], newest)
    return version / "teacher.pt"


def teacher_switch(resumed: dict, now: Optional[Path], now_sha256: Optional[str], where: str) -> str:
    """Why a resume is refused when the teacher it would go on with is not the one last.pt was trained with."""
    sha256 = resumed["teacher_sha256"]
    current = f"{now} (sha256 {now_sha256[:12]})" if now is not None else "no teacher"
    return (f"cannot resume {resumed['path']}: it was trained with teacher {resumed['teacher_checkpoint']} (sha256 "
            f"{sha256[:12]}){where}, and would go on with {current}. A resumed run keeps its teacher: start over in "
            f"a new run folder (hydra.run.dir=...), or resume with teacher_checkpoint=PATH naming that teacher (a "
            f"file of sha256 {sha256}).")


def check_unrecorded_teacher(last: Path, entry: Path) -> None:
    """A last.pt written before runs recorded their teacher's sha256 trained with the store's newest version of the
    time: when the entry now holds several, which one cannot be told, and the resume is refused."""
    complete = [v.name for v in teachers.versions(entry) if (v / "manifest.json").is_file()]
    if len(complete) > 1:
        raise ValueError(
            f"cannot resume {last}: it records no teacher sha256 (an earlier version of this repository wrote it), and "
            f"the store holds {len(complete)} versions of its teacher in {entry} ({', '.join(complete)}): which one it "
            "was trained with cannot be told here (its train.log names it, in the line 'teacher <path>'). Resume with "
            "teacher_checkpoint=<that teacher.pt>, or start over in a new run folder (hydra.run.dir=...)."
        )
