"""Score a trained student or teacher: `python -m kd.eval PATH [--split test|val|train] [--checkpoint last|best]
[--out DIR] [--teacher PATH|none] [KEY=VALUE ...]`.

PATH is a run folder (its last.pt by default, --checkpoint best for best.pt) or a checkpoint file of this repository
(a run's last.pt / best.pt, a store's teacher.pt): the run's resolved config is inside it. The data is the run's own
dataset node (same normalisation, same held-out validation split); `train` is the training split without its
augmentation. With the run's teacher (read from the path the checkpoint records, verified by its sha256) it also
gives the agreement of the two models' top-1. KEY=VALUE changes a key of the recorded config (dataset.source.root=...
for data that moved, device=cuda, eval_batch_size=...). Writes eval.json and confusion.png into --out (default:
<run folder>/eval/<checkpoint>_<split>/; never the run's own records) and prints one line.
"""
import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kd import engine, fileio, hardware, pretrained, records, teacher_checks, teachers
from kd.datapath import DataPath
from kd.loop import predict, score

SPLITS = ("test", "val", "train")
CHECKPOINTS = ("last", "best")
# What this command refuses with one line (a message that names the problem and the fix), as train.py does.
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, fileio.CannotWrite)
WHAT_IT_READS = ("kd.eval reads a run folder of this repository, or a checkpoint it wrote (a run's last.pt or best.pt, "
                 "a store's teacher.pt), whose config is inside.")


@dataclass
class Target:
    """What is scored: a checkpoint of this repository, the run's config with the command line's changes (KEY=VALUE,
    `overrides`), the teacher to compare with (its path and recorded sha256; None without one), the output folder."""

    path: Path
    checkpoint: dict[str, Any]
    cfg: DictConfig
    overrides: list[str]
    teacher: Optional[tuple[Path, str]]
    out: Path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: score, write eval.json and confusion.png, print one line; a refused input is one line."""
    args = parser().parse_intermixed_args(argv)  # KEY=VALUE before or after the options
    try:
        target = target_of(args)
        record, png = evaluate(target, args.split)
        write(target.out, record, png)
    except USER_ERRORS as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    print(summary_line(target, record))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kd.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a run folder, or a checkpoint file of this repository")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="change a key of the recorded config")
    p.add_argument("--split", choices=SPLITS, default="test", help="the split to score (default: test)")
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="last",
                   help="which checkpoint of a run folder (default: last.pt, the epoch result.json reports first)")
    p.add_argument("--out", type=Path, help="the folder for eval.json and confusion.png "
                                             "(default: <run folder>/eval/<checkpoint>_<split>/)")
    p.add_argument("--teacher", help="the teacher file to compare with (default: the run's own, by its recorded "
                                     "path; it must match the recorded sha256), or none")
    return p


def target_of(args: argparse.Namespace) -> Target:
    """Every check before any work: the checkpoint, the config and its overrides, the split, the teacher, --out."""
    path = checkpoint_path(args.path, args.checkpoint)
    checkpoint = read_checkpoint(path)
    cfg = run_config(checkpoint, args.overrides)
    if args.split == "val" and not cfg.dataset.val_fraction:
        raise ValueError(f"{path} was trained without a validation split (dataset.val_fraction=0): score "
                         "--split test or --split train.")
    out = args.out or default_out(path, args.split)
    check_out(out, path)
    teacher = run_teacher(checkpoint, path.parent, cfg, args.teacher)
    return Target(path, checkpoint, cfg, list(args.overrides), teacher, out)


def checkpoint_path(path: Path, which: str) -> Path:
    """The checkpoint file PATH names: itself, or a run folder's last.pt / best.pt."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder. {WHAT_IT_READS}")
    if path.is_file():
        return path
    found = path / f"{which}.pt"
    if not found.is_file():
        held = "it holds a run.json" if (path / "run.json").is_file() else "it holds no run.json either"
        raise FileNotFoundError(f"{path} holds no {found.name} ({held}): not a run folder of this repository, or a "
                                f"run that has not finished an epoch. {WHAT_IT_READS}")
    return found


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's payload (weights-only); a foreign or unfinished file is refused."""
    try:
        checkpoint = fileio.load_checkpoint(path, ("model", "arch", "config"))
    except fileio.UnusableCheckpoint as error:
        raise fileio.UnusableCheckpoint(f"{error} {WHAT_IT_READS}") from None
    if checkpoint.get("metrics") is None:  # before epoch 1 (an init stage's): no trained model to score yet
        raise ValueError(f"{path} was written before the run's first epoch ended: score it once that epoch is done.")
    return checkpoint


def run_config(checkpoint: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The run's resolved config, with KEY=VALUE changes to keys it has (a misspelt key is refused)."""
    cfg = OmegaConf.create(checkpoint["config"])
    form = "a change of the run's config is one KEY=VALUE (dataset.source.root=DIR)"
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))  # values read as train.py reads them
    except HydraException as error:
        raise ValueError(f"{str(error).splitlines()[0]}: {form}.") from None
    for override in parsed:
        if override.is_sweep_override() or override.is_add() or override.is_delete() or override.value() is None:
            raise ValueError(f"{override.input_line}: {form}.")
        key = override.key_or_group
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise ValueError(f"{override.input_line}: the run's config has no key {key} (kd.eval changes the config "
                             "recorded in the checkpoint: a key it holds).")
        OmegaConf.update(cfg, key, override.value())
    return cfg


def default_out(path: Path, split: str) -> Path:
    """<folder of the checkpoint>/eval/<checkpoint name>_<split>: beside the run's records, never one of them."""
    return path.parent / "eval" / f"{path.stem}_{split}"


def check_out(out: Path, checkpoint: Path) -> None:
    """Refuse an output folder inside the teacher store (its versions are immutable) or one that cannot be written;
    nothing is created here."""
    store_version = next((p for p in (out, *out.parents) if (p / "manifest.json").is_file()), None)
    if store_version is not None:
        raise ValueError(f"{out} is inside {store_version}, a version of the teacher store, which is never written "
                         f"after it is filed: give --out DIR to score {checkpoint}.")
    existing = next(p for p in (out, *out.parents) if p.exists())
    fileio.check_writable(existing, "Give a writable folder as --out DIR.")


def run_teacher(
    checkpoint: dict[str, Any], folder: Path, cfg: DictConfig, choice: Optional[str]
) -> Optional[tuple[Path, str]]:
    """The teacher the run was trained with, (path, recorded sha256), or None (a teacher run, a run without one, or
    --teacher none); a file that is missing or is not that teacher (another sha256) is refused."""
    recorded_path, sha256 = recorded_teacher(checkpoint, folder)
    if choice == "none" or sha256 is None:
        return None
    if choice is not None:
        path = Path(choice)
    elif pretrained.library_of(cfg.teacher_checkpoint):  # torchvision:<Weights> / timm:<name>: the library's cache
        path = pretrained.locate(cfg.teacher_checkpoint, cfg.teacher)
    else:
        path = Path(recorded_path)
    fix = (f"Pass --teacher PATH naming a copy of that teacher (sha256 {sha256}), or --teacher none to score without "
           "the agreement.")
    if not path.is_file():
        raise FileNotFoundError(f"teacher {path}, which the run was trained with, is not there. {fix}")
    found = fileio.sha256_file(path)
    if found != sha256:
        raise ValueError(f"teacher {path} is not the one the run was trained with (sha256 {found[:12]}, recorded "
                         f"{sha256[:12]}). {fix}")
    return path, sha256


def recorded_teacher(checkpoint: dict[str, Any], folder: Path) -> tuple[Optional[str], Optional[str]]:
    """(path, sha256) of the run's teacher: the checkpoint records them; one written before checkpoints did has them
    in its folder's result.json, once the run finished."""
    if "teacher_sha256" in checkpoint:
        return checkpoint.get("teacher_checkpoint"), checkpoint["teacher_sha256"]
    result = folder / "result.json"
    if not result.is_file():
        return None, None
    record = fileio.read_json(result, "Score the checkpoint with --teacher none, or restore that file.")
    return record.get("teacher_checkpoint"), record.get("teacher/sha256")


def evaluate(target: Target, split: str) -> tuple[dict[str, Any], bytes]:
    """Score the checkpoint's model (and its teacher) on the split, as the run evaluated it: its precision, batch
    size, memory format and threads. Returns eval.json's record and the confusion matrix's PNG."""
    cfg = target.cfg
    device = hardware.resolve_device(cfg.device)
    hardware.configure_determinism(cfg.deterministic)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    data = engine.load_data(cfg.dataset, device, hardware.use_channels_last(cfg.channels_last, device))
    amp_dtype = precision(target, device)
    model = instantiate(target.checkpoint["arch"])
    model.load_state_dict(target.checkpoint["model"])
    model = model.to(device, memory_format=hardware.memory_format(data)).eval()
    labels = data.split_labels(split)
    logits = predict(model, data, split, cfg.eval_batch_size, amp_dtype)
    reference = None
    record = {"checkpoint": str(target.path), "checkpoint_sha256": fileio.sha256_file(target.path), "split": split,
              "epoch": trained_epochs(target.checkpoint["metrics"]), "images": len(labels), "classes": data.classes,
              "precision": hardware.precision_name(amp_dtype), "device": str(device), "overrides": target.overrides,
              "config": records.plain_config(cfg)}
    if target.teacher is not None:
        reference = teacher_predictions(target, data, split, amp_dtype)
        record.update({"teacher_checkpoint": str(target.teacher[0]), "teacher/sha256": target.teacher[1]})
        record[f"teacher/{split}/acc1"] = score_top1(reference, labels)
        reference = reference.argmax(1)
    record.update({f"{split}/{key}": value for key, value in score(logits, labels, reference).items()})
    recorded = target.checkpoint["metrics"].get(f"{split}/acc1")
    if recorded is not None:
        record["recorded_acc1"] = recorded  # what the run measured at that epoch
    matrix = confusion(logits.argmax(1), labels, len(data.classes))
    record["confusion"] = matrix.tolist()
    title = f"{records.model_name(OmegaConf.create(target.checkpoint['arch']))} on {split}"
    return record, confusion_png(matrix, data.classes, f"{title}: top-1 {record[f'{split}/acc1']:.2f}%")


def trained_epochs(metrics: dict[str, Any]) -> int:
    """The epoch a checkpoint holds: a run's last.pt / best.pt record their epoch's metrics, a store's teacher.pt its
    run's result (its `epochs`)."""
    return metrics["epoch"] if "epoch" in metrics else metrics["epochs"]


def precision(target: Target, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype the run evaluated in (its last.pt records it); precision=... on the command line wins."""
    recorded = target.checkpoint.get("precision")
    if recorded is None or any(o.split("=", 1)[0] == "precision" for o in target.overrides):
        return hardware.resolve_precision(target.cfg.precision, device)
    return hardware.PRECISIONS[recorded]


def teacher_predictions(target: Target, data: DataPath, split: str, amp_dtype: Optional[torch.dtype]) -> Tensor:
    """The teacher's logits on the split, from the frozen teacher the student phase ran (BatchNorm folded)."""
    path, _ = target.teacher
    teacher_file = teachers.read(path, target.cfg.teacher, target.cfg.get("teacher_checkpoint_key"))
    teacher = teacher_checks.freeze_teacher(teachers.build(teacher_file, target.cfg.teacher, data.device), data)
    return predict(teacher, data, split, target.cfg.eval_batch_size, amp_dtype)


def score_top1(logits: Tensor, labels: Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


def confusion(predicted: Tensor, labels: Tensor, classes: int) -> Tensor:
    """counts[true, predicted]."""
    pairs = labels.to(torch.int64) * classes + predicted.to(torch.int64)
    return torch.bincount(pairs.cpu(), minlength=classes * classes).view(classes, classes)


def confusion_png(matrix: Tensor, classes: list[str], title: str) -> bytes:
    """The confusion matrix as a PNG: each row (a true class) as fractions of its images; class names on the axes
    up to 30 classes, counts in the cells up to 12."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    n = len(classes)
    rows = matrix.double() / matrix.sum(1, keepdim=True).clamp(min=1)
    figure = Figure(figsize=(min(4 + 0.3 * n, 14),) * 2)
    axes = figure.add_subplot()
    image = axes.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="fraction of the true class")
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 30:
        axes.set_xticks(range(n), classes, rotation=90)
        axes.set_yticks(range(n), classes)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                colour = "white" if rows[i, j] > 0.5 else "black"
                axes.text(j, i, int(matrix[i, j]), ha="center", va="center", color=colour)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})  # no version: same bytes each time
    return buffer.getvalue()


def write(out: Path, record: dict[str, Any], png: bytes) -> None:
    """eval.json and confusion.png, each written atomically."""
    fix = "Give a writable folder as --out DIR."
    with fileio.writing(out, fix):
        fileio.write_json(out / "eval.json", record)
        fileio.atomic_write_bytes(out / "confusion.png", png)


def summary_line(target: Target, record: dict[str, Any]) -> str:
    split = record["split"]
    line = (f"{target.path} (epoch {record['epoch']}) on {split}, {record['images']} images: top-1 "
            f"{record[f'{split}/acc1']:.2f}, top-5 {record[f'{split}/acc5']:.2f}")
    if f"{split}/agreement" in record:
        line += f", agreement {record[f'{split}/agreement']:.2f} with its teacher (top-1 "
        line += f"{record[f'teacher/{split}/acc1']:.2f})"
    return line + f" -> {target.out / 'eval.json'}"


if __name__ == "__main__":
    sys.exit(main())
