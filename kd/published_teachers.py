"""The published CIFAR-100 teachers, fetched into a teachers_dir, recorded by sha256 and verified on every read.

    python -m kd.teachers fetch crd [--dir DIR] [--from URL ...] [--only MODEL ...]

They are RepDistiller's (scripts/fetch_pretrained_teachers.sh downloads one file per teacher from the authors'
university server), which mdistiller re-ships as one archive (cifar_teachers.tar on its GitHub release
`checkpoints`) and the DKD tables use. No publisher gives their hashes, so each file's sha256 is recorded at its
first fetch in DIR/manifest.json (with size, source and time) and checked at every later fetch and read: a download
or a file that differs is refused. A student's records name the same hash (teacher/sha256), so users can compare.
"""
import argparse
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from kd import checkpoints, fileio

log = logging.getLogger(__name__)

# Where RepDistiller (scripts/fetch_pretrained_teachers.sh) and mdistiller (cifar_teachers.tar) keep each teacher.
PUBLISHED_LAYOUT = "{model}_vanilla/ckpt_epoch_240.pth"
MANIFEST = "manifest.json"
MANIFEST_KIND = "kd.published_teachers"
# Written into each fetch's scratch folder (.fetch-*): a later fetch deletes a scratch folder a killed one left only
# when it holds this file, so a folder of the user's that happens to match the name is never touched.
SCRATCH_MARKER = ".kd-fetch-scratch"
# The teachers of both CRD CIFAR-100 tables, by this repository's model names (which are RepDistiller's); the DKD
# tables use the same files (mdistiller/models/cifar/__init__.py reads these six from cifar_teachers/).
TEACHERS = ("resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13", "ResNet50")
SETS = {"crd": TEACHERS, "dkd": TEACHERS}
# HobbitLong/RepDistiller@b84f547c scripts/fetch_pretrained_teachers.sh: one file per teacher, on MIT CSAIL's server.
ORIGINAL_HOST = "http://shape2prog.csail.mit.edu/repo/{model}_vanilla/ckpt_epoch_240.pth"
# megvii-research/mdistiller@a08d46f README.md lines 119 and 137: the archive on the release tagged `checkpoints`.
RELEASE_PAGE = "https://github.com/megvii-research/mdistiller/releases/tag/checkpoints"
RELEASE_ARCHIVE = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
# The archive first: one download from a durable host; the original server for what the archive lacks.
DEFAULT_SOURCES = (RELEASE_ARCHIVE, ORIGINAL_HOST)
DEFAULT_DIR = Path("outputs/cifar_teachers")
BLOCK = 1 << 20


class FetchFailed(RuntimeError):
    """Teachers that could not be fetched, or whose file changed since: the URLs tried and where each belongs."""


@dataclass
class Download:
    """One teacher's bytes, downloaded into the scratch folder, and where they came from."""

    path: Path
    source: str
    member: Optional[str] = None  # the archive member, for an archive source


def fetch(folder: Path, models: Sequence[str], sources: Sequence[str] = DEFAULT_SOURCES, num_classes: int = 100,
          timeout_s: float = 60.0) -> dict[str, str]:
    """Fetch each model's teacher into `folder` (PUBLISHED_LAYOUT) from the first source that serves a readable
    checkpoint of that model with the sha256 the manifest holds (any, at its first fetch), and record it; returns
    what was done per model. A source with `{model}` in it is one URL per teacher, any other a tar archive."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # One fetch per folder at a time; scratch files live in the folder, so a rename files them atomically.
    with FileLock(folder / ".fetch.lock"):
        for stale in folder.glob(".fetch-*"):  # what a killed fetch left (none is running: we hold the lock)
            if (stale / SCRATCH_MARKER).is_file():  # only a folder a fetch made and marked; anything else stays
                shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as scratch:
            (Path(scratch) / SCRATCH_MARKER).touch()
            return fetch_into(folder, models, sources, Path(scratch), num_classes, timeout_s)


def fetch_into(folder: Path, models: Sequence[str], sources: Sequence[str], scratch: Path, num_classes: int,
               timeout_s: float) -> dict[str, str]:
    """fetch's work, under the folder's lock, with downloads in `scratch`."""
    manifest = read_manifest(folder)
    done, refused = in_place(folder, models, manifest, num_classes)
    todo, tried = [m for m in models if m not in done and m not in refused], []
    for source in sources:
        for model, download in downloads(source, todo, scratch, timeout_s, tried):
            digest, problem = check(download, model, manifest, num_classes)
            if problem:
                tried.append(f"{download.source}{f' ({download.member})' if download.member else ''}: {problem}")
                continue
            done[model] = file_teacher(folder, manifest, model, download, digest)
        todo = [m for m in todo if m not in done]
    if todo or refused:
        raise FetchFailed(failure_message(folder, todo, refused, tried))
    for attempt in tried:  # sources that failed before one served the file
        log.warning("not used: %s", attempt)
    return done


def in_place(folder: Path, models: Sequence[str], manifest: dict, num_classes: int) -> tuple[dict, dict]:
    """The teachers already in the folder: a recorded one must match its sha256; an unrecorded one (copied there by
    hand) is recorded when it reads as that model's checkpoint. Returns (done, refused) by model."""
    done, refused = {}, {}
    for model in models:
        path = folder / PUBLISHED_LAYOUT.format(model=model)
        if not path.is_file():
            continue
        recorded, digest = manifest["files"].get(relative(model)), fileio.sha256_file(path)
        if recorded is not None and digest != recorded["sha256"]:
            refused[model] = (f"{path} has sha256 {digest}, but {folder / MANIFEST} recorded {recorded['sha256']} "
                              f"at its fetch: the file changed since. Delete it to fetch it again.")
        elif recorded is not None:
            done[model] = f"{model}: {path} already fetched, sha256 {digest} as recorded"
        elif problem := unreadable(path, model, num_classes):
            refused[model] = f"{path} (not fetched: found there) {problem}; left as it is."
        else:
            record(folder, manifest, model, {"sha256": digest, "size": path.stat().st_size, "source": "in place"})
            done[model] = f"{model}: {path} was already there (not downloaded): recorded its sha256 {digest}"
    return done, refused


def downloads(source: str, models: Sequence[str], scratch: Path, timeout_s: float,
              tried: list[str]) -> Iterator[tuple[str, Download]]:
    """Each model's file from one source, as downloaded; each failure is added to `tried` as `URL: error`."""
    if not models:
        return
    if "{model}" not in source:
        yield from archive_members(source, models, scratch, timeout_s, tried)
        return
    for model in models:
        url = source.replace("{model}", model)
        error = download_to(url, scratch / f"{model}.download", timeout_s)
        if error:
            tried.append(f"{url}: {error}")
        else:
            yield model, Download(scratch / f"{model}.download", url)


def archive_members(url: str, models: Sequence[str], scratch: Path, timeout_s: float,
                    tried: list[str]) -> Iterator[tuple[str, Download]]:
    """Each model's file from a tar archive (any compression), found by its layout under any top folder
    (cifar_teachers/ in mdistiller's); only regular files are read, each to a path of our choosing."""
    archive = scratch / "archive.download"
    error = download_to(url, archive, timeout_s)
    if error:
        tried.append(f"{url}: {error}")
        return
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            for model in models:
                layout = PUBLISHED_LAYOUT.format(model=model)
                member = next((m for m in members if m.name == layout or m.name.endswith(f"/{layout}")), None)
                if member is None:
                    tried.append(f"{url}: the archive holds no */{layout}")
                    continue
                with tar.extractfile(member) as src, (scratch / f"{model}.download").open("wb") as out:
                    shutil.copyfileobj(src, out, BLOCK)
                yield model, Download(scratch / f"{model}.download", url, member.name)
    except (tarfile.TarError, EOFError) as error:
        tried.append(f"{url}: not a readable tar archive ({error})")
    finally:
        archive.unlink(missing_ok=True)


def download_to(url: str, target: Path, timeout_s: float) -> Optional[str]:
    """Download `url` into `target`; the error as a phrase when it fails (then nothing in `target` is used)."""
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, target.open("wb") as out:
            shutil.copyfileobj(response, out, BLOCK)
            length = response.headers.get("Content-Length")
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code} {error.reason}"
    except urllib.error.URLError as error:
        return f"unreachable ({error.reason})"
    except (OSError, ValueError) as error:  # a timeout or reset mid-transfer, an unknown URL scheme
        return f"{type(error).__name__}: {error}"
    if length is not None and target.stat().st_size != int(length):
        return f"cut off after {target.stat().st_size} of {length} bytes"
    return None


def check(download: Download, model: str, manifest: dict, num_classes: int) -> tuple[str, Optional[str]]:
    """The download's sha256, and why it is refused (None: it is not): another sha256 than the one recorded at the
    first fetch, or not a readable checkpoint of the model."""
    digest, recorded = fileio.sha256_file(download.path), manifest["files"].get(relative(model))
    if recorded is not None and digest != recorded["sha256"]:
        return digest, (f"refused: sha256 {digest}, but {MANIFEST} recorded {recorded['sha256']} at the first fetch "
                        f"(from {recorded['source']}, {recorded['fetched_at']}); the host now serves other bytes")
    return digest, unreadable(download.path, model, num_classes)


def unreadable(path: Path, model: str, num_classes: int) -> Optional[str]:
    """Why a file is not a teacher checkpoint that loads strictly into `model` (None when it is)."""
    try:
        checkpoints.read_teacher_file(path, model_node(model, num_classes))
    except Exception as error:  # bytes from elsewhere: whatever fails to read them makes them unusable
        return f"is not a readable {model} checkpoint ({type(error).__name__}: {error})"
    return None


def model_node(model: str, num_classes: int) -> DictConfig:
    """The model@teacher node of a published teacher: the model option at width 1 with the dataset's classes."""
    return OmegaConf.merge(OmegaConf.load(checkpoints.MODEL_OPTIONS / f"{model}.yaml"),
                           {"num_classes": num_classes, "width": 1.0})


def file_teacher(folder: Path, manifest: dict, model: str, download: Download, digest: str) -> str:
    """Record a checked download in the manifest (its first fetch's record is kept), then rename it into place,
    read-only: a fetch killed in between leaves a recorded hash that the next fetch's download must match."""
    path = folder / PUBLISHED_LAYOUT.format(model=model)
    if relative(model) not in manifest["files"]:
        entry = {"sha256": digest, "size": download.path.stat().st_size, "source": download.source}
        record(folder, manifest, model, {**entry, **({"archive_member": download.member} if download.member else {})})
    path.parent.mkdir(exist_ok=True)
    os.replace(download.path, path)
    path.chmod(path.stat().st_mode & ~0o222)
    return f"{model}: fetched {path} from {download.source} (sha256 {digest})"


def record(folder: Path, manifest: dict, model: str, entry: dict[str, Any]) -> None:
    """Add a teacher's first record to the manifest and write it (atomically)."""
    manifest["files"][relative(model)] = {**entry, "model": model,
                                          "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    fileio.write_json(folder / MANIFEST, manifest)


def relative(model: str) -> str:
    return PUBLISHED_LAYOUT.format(model=model)


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest (an empty one before the first fetch); a damaged or foreign one names itself."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {"kind": MANIFEST_KIND, "files": {}}
    manifest = fileio.read_json(path, f"Delete {path} to record the teachers' sha256s again at the next fetch.")
    if manifest.get("kind") != MANIFEST_KIND or not isinstance(manifest.get("files"), dict):
        raise fileio.CorruptRecord(f"{path} is not a manifest of fetched teachers (kind {manifest.get('kind')!r}): "
                                    "fetch into a folder of their own (--dir).")
    return manifest


def verified_sha256(path: Path) -> Optional[str]:
    """A fetched teacher's sha256, refused unless it is the one recorded at its fetch; None for a file that is not
    in a fetched folder's manifest (a store teacher, a file by path, one copied in by hand and not yet recorded)."""
    path = Path(path)
    folder, model = path.parent.parent, path.parent.name.removesuffix("_vanilla")
    if folder / relative(model) != path or not (folder / MANIFEST).is_file():
        return None
    recorded = read_manifest(folder)["files"].get(relative(model))
    if recorded is None:
        return None
    digest = fileio.sha256_file(path)
    if digest != recorded["sha256"]:
        raise ValueError(f"{path} has sha256 {digest}, but {folder / MANIFEST} recorded {recorded['sha256']} when it "
                         f"was fetched ({recorded['source']}): the file changed since. Delete it and run "
                         f"`python -m kd.teachers fetch crd --dir {folder}` to fetch it again.")
    return digest


def failure_message(folder: Path, missing: Sequence[str], refused: dict[str, str], tried: Sequence[str]) -> str:
    """What is missing and why: each refused file, each teacher no source served with where it belongs, each URL
    tried with its error, and how to place a copy by hand."""
    lines = [f"{len(missing) + len(refused)} published teacher(s) not fetched into {folder}:"]
    lines += [f"  {model}: {problem}" for model, problem in refused.items()]
    lines += [f"  {model}: no source served it; it belongs at {folder / relative(model)}" for model in missing]
    lines += ["Tried:", *[f"  {attempt}" for attempt in tried]] if tried else []
    if missing:
        lines.append("RepDistiller's original host (shape2prog.csail.mit.edu, a university server) may be gone; "
                     f"mdistiller re-ships the same teachers as cifar_teachers.tar on {RELEASE_PAGE}.")
        lines.append("To place a copy by hand: pass a downloaded archive as --from file:///path/to/cifar_teachers.tar, "
                     f"or put each file at {folder}/{PUBLISHED_LAYOUT} (RepDistiller's and mdistiller's layout) and "
                     "rerun this command, which records its sha256.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m kd.teachers fetch SET`: 0 when every teacher is in place and verified, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m kd.teachers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetching = commands.add_parser("fetch", help="download the published CIFAR-100 teachers into a teachers_dir")
    fetching.add_argument("set", choices=sorted(SETS), help="whose teachers: crd and dkd use the same six")
    fetching.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the teachers_dir (default {DEFAULT_DIR})")
    fetching.add_argument("--from", dest="sources", nargs="+", metavar="URL", default=list(DEFAULT_SOURCES),
                          help="sources in order: a URL with {model} per teacher, any other a tar archive "
                               "(file:// for a local copy); default: mdistiller's archive, then RepDistiller's host")
    fetching.add_argument("--only", nargs="+", metavar="MODEL", choices=TEACHERS, help="only these teachers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="kd.teachers: %(message)s")
    try:
        done = fetch(args.dir, args.only or SETS[args.set], args.sources)
    except (FetchFailed, ValueError) as error:
        print(f"kd.teachers: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # downloads report their own errors: this is the folder
        print(f"kd.teachers: cannot write {args.dir} ({error}): point --dir at a writable folder.", file=sys.stderr)
        return 1
    print("\n".join(done.values()))
    print(f"Use them with teachers_dir={args.dir} (e.g. python train.py -m sweep=crd_table1 teachers_dir={args.dir}).")
    return 0
