"""The streaming data path (kd.streaming) and the ImageNet-style sources: views a pure function of (seed, epoch,
index) for any number of workers or ranks, the torchvision reference geometry, each rank decoding only its share,
the same views as the in-memory path where both serve a folder, bad input named, and whole runs through train.py
(end to end, killed and resumed, 2 ranks) and the teacher-output cache.
"""
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

import kd.config  # noqa: F401  (registers the schema)
from kd import data, distributed, engine, streaming
from kd.data import epoch_generator
from kd.datapath import InMemoryData
from support import forked
from support.images import CLASSES, smooth_image, write_imagenet, write_tiny_imagenet
from tools import bench

REPO = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return write_imagenet(tmp_path_factory.mktemp("imagenet") / "imagenet")


def stream(
    root: Path, size: int = 32, workers: int = 0, val_fraction: float = 0.0, scan: bool = True
) -> streaming.StreamingData:
    source = data.imagenet(str(root), image_size=size, num_workers=workers, scan=scan)
    train, val = data.hold_out(source.train, val_fraction, 0)
    stats = [torch.full((1, 3, 1, 1), v) for v in (0.5, 0.25)]
    return streaming.StreamingData.from_files(source, train, val, *stats, (0, True))


def epoch_of(path, seed: int = 0, epoch: int = 1, batch_size: int = 5) -> list:
    return list(path.epoch(seed, epoch, batch_size))


# ---------------------------------------------------------------------------------------------------------------
# views: a pure function of (seed, epoch, index)


def test_views_are_the_same_for_0_and_2_workers(imagenet_root):
    single, parallel = stream(imagenet_root, workers=0), stream(imagenet_root, workers=2)
    for epoch in (1, 2):
        for a, b in zip(epoch_of(single, epoch=epoch), epoch_of(parallel, epoch=epoch), strict=True):
            assert torch.equal(a.views, b.views) and torch.equal(a.labels, b.labels)
            assert torch.equal(a.index, b.index) and (a.rows, a.size) == (b.rows, b.size)
    assert torch.equal(torch.cat(list(single.evaluation("test", 4))), torch.cat(list(parallel.evaluation("test", 4))))


def test_a_view_depends_on_seed_epoch_and_index_only(imagenet_root):
    path = stream(imagenet_root)
    views = {}
    for batch_size in (5, 7):  # other batches, other positions in them: the same view of each sample
        for batch in epoch_of(path, batch_size=batch_size):
            for view, index in zip(batch.views, batch.index.tolist()):
                assert torch.equal(views.setdefault(index, view), view)
    assert sorted(views) == list(range(path.num_train))
    key = streaming.ViewKey(3, seed=0, epoch=1)
    assert torch.equal(streaming.train_view(path.train.path(3), path.recipe, key), views[3])
    other_epoch = {i: v for b in epoch_of(path, epoch=2) for i, v in zip(b.index.tolist(), b.views)}
    other_seed = {i: v for b in epoch_of(path, seed=1) for i, v in zip(b.index.tolist(), b.views)}
    assert sum(not torch.equal(views[i], other_epoch[i]) for i in views) > path.num_train * 0.9
    assert sum(not torch.equal(views[i], other_seed[i]) for i in views) > path.num_train * 0.9


def test_epoch_order_is_the_in_memory_paths(imagenet_root):
    path = stream(imagenet_root)
    order = torch.cat([b.index for b in epoch_of(path, seed=3, epoch=4)])
    assert torch.equal(order, torch.randperm(path.num_train, generator=epoch_generator(3, 4)))


def test_each_rank_decodes_only_its_share_of_each_global_batch(imagenet_root, monkeypatch):
    """Two ranks simulated in one process: rank r decodes exactly shard r of every global batch, with the rows the
    teacher cache reads; together they decode the epoch once, and the evaluation split once."""
    path = stream(imagenet_root)
    whole, evaluation = epoch_of(path, batch_size=7), torch.cat(list(path.evaluation("test", 4)))
    decoded = {}
    real = streaming.Views.__getitem__
    monkeypatch.setattr(streaming.Views, "__getitem__", lambda self, key: decoded[rank].append(key) or real(self, key))
    evaluated = []
    for rank in (0, 1):
        decoded[rank] = []
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        for batch, full in zip(epoch_of(path, batch_size=7), whole, strict=True):
            share = slice(*((0, full.size // 2) if rank == 0 else (full.size // 2, full.size)))
            assert torch.equal(batch.index, full.index[share]) and torch.equal(batch.views, full.views[share])
            assert batch.rows == slice(full.rows.start + share.start, full.rows.start + share.stop)
            assert batch.size == full.size
        evaluated += torch.cat(list(path.evaluation("test", 4))).unbind()
    train_keys = [k.index for r in (0, 1) for k in decoded[r] if isinstance(k, streaming.ViewKey)]
    assert sorted(train_keys) == list(range(path.num_train))  # each sample once, on one rank
    assert torch.equal(torch.stack(evaluated), evaluation)


def test_resized_crop_boxes_follow_torchvisions_distribution():
    height, width, n = 240, 320, 4000
    ours = np.array([streaming.resized_crop_box(height, width, streaming.view_generator(0, 0, i), (0.08, 1.0),
                                                (3 / 4, 4 / 3)) for i in range(n)])
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    for boxes in (ours, theirs):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    stats = [(b[:, 2] * b[:, 3] / (height * width), np.log(b[:, 3] / b[:, 2]), b[:, 0] / height)
             for b in (ours, theirs)]
    for mine, reference in zip(*stats):
        assert abs(mine.mean() - reference.mean()) < 0.02 and abs(mine.std() - reference.std()) < 0.02
    # When no try fits (a strip far outside the ratios, areas near the whole), both fall back to the same centred box.
    fallback = streaming.resized_crop_box(100, 10, streaming.view_generator(0, 0, 0), (0.9, 1.0), (3 / 4, 4 / 3))
    assert fallback == tuple(transforms.RandomResizedCrop.get_params(torch.zeros(3, 100, 10), [0.9, 1.0],
                                                                     [3 / 4, 4 / 3]))


def gradient_jpeg(path: Path, height: int, width: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (height + width)], -1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return Image.open(path).convert("RGB")


@pytest.mark.parametrize("height, width", [(180, 300), (300, 180)])
def test_views_have_torchvisions_geometry(tmp_path, height, width):
    """Evaluation: Resize(256/224 * size) + CenterCrop(size); training: a box resized to size, as torchvision's
    transforms make them on a PIL image (up to resampling: one crop-and-resize here, two steps there)."""
    image = gradient_jpeg(tmp_path / "g.JPEG", height, width)
    recipe = streaming.Recipe("resized_crop", 64)
    expected = transforms.Compose([transforms.Resize(73), transforms.CenterCrop(64), transforms.PILToTensor()])(image)
    assert (streaming.eval_view(tmp_path / "g.JPEG", recipe).int() - expected.int()).abs().float().mean() < 1.0
    box = (20, 30, 100, 120)
    crop = streaming.load_region(tmp_path / "g.JPEG", 64, lambda h, w: box)
    reference = TF.pil_to_tensor(TF.resized_crop(image, *box, [64, 64]))
    assert (crop.int() - reference.int()).abs().float().mean() < 0.1  # a box 2 pixels off: 1.9


def test_large_crops_decode_at_reduced_scale_to_nearly_the_full_decode(tmp_path, monkeypatch):
    gradient_jpeg(tmp_path / "big.JPEG", 900, 1200)
    decoded = []
    real = streaming.simplejpeg.decode_jpeg
    monkeypatch.setattr(streaming.simplejpeg, "decode_jpeg", lambda *a, **k: decoded.append(k) or real(*a, **k))
    box = lambda h, w: (100, 200, 600, 800)  # noqa: E731  600 x 800 to 64 px: decoded at 1/8
    reduced = streaming.load_region(tmp_path / "big.JPEG", 64, box)
    assert (decoded[-1]["min_height"], decoded[-1]["min_width"]) == (113, 150)
    full = streaming.resize(np.array(Image.open(tmp_path / "big.JPEG").convert("RGB"))[100:700, 200:1000], 64)
    assert (reduced.int() - full.int()).abs().float().mean() < 2


def test_odd_files_decode_like_pillow_reads_them(imagenet_root):
    """Greyscale and CMYK JPEGs and a PNG named .JPEG (all in ImageNet) give RGB views; the centre crop of the CMYK
    one matches Pillow's RGB conversion."""
    recipe = streaming.Recipe("resized_crop", 32)
    for name in ("ant_grey", "ant_cmyk", "ant_png"):
        path = imagenet_root / "train" / "ant" / f"{name}.JPEG"
        view = streaming.eval_view(path, recipe)
        assert view.shape == (3, 32, 32) and view.dtype == torch.uint8
        expected = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.PILToTensor()])(
            Image.open(path).convert("RGB"))
        assert (view.int() - expected.int()).abs().float().mean() < 3, name


# ---------------------------------------------------------------------------------------------------------------
# the pad-crop recipe streams the in-memory path's views


def write_folder(root: Path, count: int = 10, size: int = 20) -> Path:
    rng = np.random.default_rng(1)
    for part in ("train", "test"):
        for label, name in enumerate(CLASSES[:2]):
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(smooth_image(rng, size + i, size + 2 * i, label)).save(root / part / name / f"{i}.png")
    return root


def test_an_image_folder_gives_the_same_batches_on_both_paths(tmp_path):
    root = write_folder(tmp_path / "images")
    splits = data.image_folder(str(root), 16, path="memory")
    files = data.image_folder(str(root), 16, path="stream", num_workers=0)
    assert isinstance(splits, data.Splits) and isinstance(files, data.FileSplits)
    stats = [torch.full((1, 3, 1, 1), v) for v in (0.5, 0.25)]
    memory = InMemoryData(splits.train, None, splits.test, *stats, 4, True, True, splits.classes)
    streamed = streaming.StreamingData.from_files(files, files.train, None, *stats, (4, True), channels_last=True)
    for epoch in (1, 2):
        for a, b in zip(memory.epoch(7, epoch, 6), streamed.epoch(7, epoch, 6), strict=True):
            assert torch.equal(a.views, b.views) and torch.equal(a.index, b.index) and a.rows == b.rows
            assert torch.equal(memory.inputs(a.views), streamed.inputs(b.views))
    assert torch.equal(torch.cat(list(memory.evaluation("test", 8))), torch.cat(list(streamed.evaluation("test", 8))))
    assert torch.equal(memory.sample_inputs(2), streamed.sample_inputs(2))


def test_imagefolder_chooses_its_path_by_decoded_size(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="kd.data")
    root = write_folder(tmp_path / "images")  # 40 images: 40 * 3 * 16 * 16 = 30,720 bytes decoded at 16 px
    assert isinstance(data.image_folder(str(root), 16, in_memory_max_gb=31_000e-9), data.Splits)
    streamed = data.image_folder(str(root), 16, in_memory_max_gb=30_000e-9)
    assert isinstance(streamed, data.FileSplits) and streamed.recipe == "pad_crop"
    assert "above dataset.source.in_memory_max_gb" in caplog.text
    assert isinstance(data.image_folder(str(root), 16, path="stream"), data.FileSplits)
    assert isinstance(data.image_folder(str(root), 16, path="memory", in_memory_max_gb=0), data.Splits)
    assert data.image_folder(str(root), 16, recipe="resized_crop").recipe == "resized_crop"  # resized crops stream
    with pytest.raises(ValueError, match="path=memory with recipe=resized_crop: the in-memory path crops with"):
        data.image_folder(str(root), 16, path="memory", recipe="resized_crop")
    with pytest.raises(ValueError, match="dataset.source.path=disk: must be one of auto, memory, stream"):
        data.image_folder(str(root), 16, path="disk")


# ---------------------------------------------------------------------------------------------------------------
# bad input: refused before any work, or named where it is met


def test_imagenet_layouts_that_cannot_work_are_refused_before_any_decode(tmp_path):
    root = write_imagenet(tmp_path / "a", per_class={"train": 1, "val": 1})
    (root / "train" / "dog").mkdir()
    Image.new("RGB", (8, 8)).save(root / "train" / "dog" / "dog_0.JPEG")
    with pytest.raises(ValueError, match=re.escape("train and val hold different classes (only in train: ['dog'], "
                                                   "only in val: [])")):
        data.imagenet(str(root))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere" / "train")) + " does not exist: "
                       "dataset.source.root must hold train/<class>/ and val/<class>/ folders"):
        data.imagenet(str(tmp_path / "nowhere"))
    loose = tmp_path / "loose"
    (loose / "train" / "ant").mkdir(parents=True)
    (loose / "val").mkdir()
    Image.new("RGB", (8, 8)).save(loose / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(FileNotFoundError, match="holds its images loose: sort them into val/<wnid>/ folders"):
        data.imagenet(str(loose))


def test_an_unreadable_jpeg_met_in_a_worker_is_named(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class={"train": 2, "val": 1})
    broken = root / "train" / "bee" / "bee_01.JPEG"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])  # truncated
    path = stream(root, workers=2, scan=False)  # past the pre-flight scan, which lists it (test_preflight_scan.py)
    with pytest.raises(Exception, match=re.escape(str(broken)) + r" cannot be decoded as an image"):
        epoch_of(path)


def test_an_empty_file_is_named_by_the_train_digest(tmp_path):
    root = write_imagenet(tmp_path / "imagenet", per_class={"train": 2, "val": 1})
    (root / "train" / "cat" / "cat_00.JPEG").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(root / "train" / "cat" / "cat_00.JPEG")) + " is empty"):
        stream(root, scan=False).train_digest()  # past the pre-flight scan, which lists it


# ---------------------------------------------------------------------------------------------------------------
# the training data's content address


def test_train_digest_covers_names_labels_sizes_and_each_files_ends(tmp_path):
    root = write_imagenet(tmp_path / "a", per_class={"train": 2, "val": 1})
    big = root / "train" / "bee" / "bee_big.JPEG"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(big, quality=95)
    assert big.stat().st_size > 3 * streaming.SAMPLE_BYTES
    digest = stream(root).train_digest()
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    assert stream(copy).train_digest() == digest  # the content's address, not its location or file times
    assert stream(root, size=48).train_digest() != digest  # other views
    full = stream(root)
    full.digest = "full"
    full_digest = full.train_digest()
    content = bytearray(big.read_bytes())
    content[len(content) // 2] ^= 0xFF  # the same size, one byte changed in the middle: outside the sample
    big.write_bytes(bytes(content))
    assert stream(root).train_digest() == digest  # documented: a sampled digest does not see it
    full = stream(root)
    full.digest = "full"
    assert full.train_digest() != full_digest  # a full one does
    content[10] ^= 0xFF  # in the first 4 KiB
    big.write_bytes(bytes(content))
    assert stream(root).train_digest() != digest
    (root / "train" / "bee" / "bee_big.JPEG").rename(root / "train" / "bee" / "bee_zz.JPEG")
    assert stream(root).train_digest() not in (digest, stream(copy).train_digest())


# ---------------------------------------------------------------------------------------------------------------
# Tiny ImageNet


def test_tiny_imagenet_layout_loads_in_memory(tmp_path):
    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    with initialize(version_base="1.3", config_path="../conf"):
        cfg = compose("config", overrides=["dataset=tiny_imagenet", f"dataset.source.root={root}",
                                           "dataset.num_classes=3", "dataset.source.cache_dir=null"])
    loaded = engine.load_data(cfg.dataset, torch.device("cpu"))
    assert isinstance(loaded, InMemoryData) and loaded.classes == ["n01", "n02", "n03"]
    assert loaded.image_shape == (3, 64, 64) and loaded.splits == ("test",)
    assert loaded.train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert loaded.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    # val_2.JPEG and val_3.JPEG are n01's (the annotation's second class): label 0, and their pixels
    expected = np.array(Image.open(root / "val" / "images" / "val_2.JPEG").convert("RGB"))
    assert torch.equal(loaded.test.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_tiny_imagenet_without_its_annotations_or_a_class_is_refused(tmp_path):
    root = write_tiny_imagenet(tmp_path / "t")
    annotations = root / "val" / "val_annotations.txt"
    kept = annotations.read_text()
    annotations.write_text("".join(line + "\n" for line in kept.splitlines() if "\tn03\t" not in line))
    with pytest.raises(ValueError, match=re.escape("classes present in train but missing in val (1: ['n03'])")):
        data.tiny_imagenet(str(root))
    annotations.write_text(kept + "val_9.JPEG\tn09\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="labels val_9.JPEG n09, a class train/ does not hold"):
        data.tiny_imagenet(str(root))
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(annotations)) + " does not exist"):
        data.tiny_imagenet(str(root))


# ---------------------------------------------------------------------------------------------------------------
# the decode benchmark runs


def test_decode_benchmark_prints_both_tables(tmp_path, capsys):
    source = tmp_path / "source"
    write_folder(source, count=3)
    result = bench.main(["--data", "--folder", str(tmp_path / "jpegs"), "--make-from", str(source), "--per-class", "3",
                              "--size", "48x40", "--crop", "32", "--workers", "0", "--batch-size", "4",
                              "--decoder-images", "6", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "simplejpeg + torch uint8 resize (kd.streaming)" in out and "(b) / (a):" in out
    assert len(list((tmp_path / "jpegs" / "train").glob("*/*.jpg"))) == 6
    assert result["loaders"]["(b) kd.streaming (uint8 views)"]["images"] == 6 and result["ratio"]["per_cpu_s"] > 0


# ---------------------------------------------------------------------------------------------------------------
# whole runs on the streaming path

# ImageNet-style folder at 32 px, tiny CNNs, one thread, two epochs.
RUN = ["experiment=quickstart", "dataset=imagenet", "dataset.num_classes=3", "dataset.source.image_size=32",
       "teacher_recipe=student", "model@teacher=resnet8", "teacher.width=0.25", "model@student=simple_cnn",
       "student.width=0.25", "epochs=2", "batch_size=8", "profile=false", "logger.mode=disabled", "threads=1"]


def compose_cfg(tmp: Path, root: Path, *overrides: str):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=[*RUN, f"dataset.source.root={root}", f"teacher_store={tmp / 'teachers'}",
                                            *overrides])


def trained(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(("train/", "test/"))}


def test_teacher_cache_serves_the_streaming_path_bit_for_bit(imagenet_root, tmp_path):
    """A student reading its teacher's outputs from the cache trains to the bits of one running the teacher live; the
    cache keys on the streamed folder's digest."""
    engine.run(compose_cfg(tmp_path, imagenet_root, "phase=teacher", "dataset.source.num_workers=0"), tmp_path / "t")
    student = ["phase=student", "dataset.source.num_workers=0", "loss=kd"]
    live = engine.run(compose_cfg(tmp_path, imagenet_root, *student, "teacher_cache=false"), tmp_path / "live")
    engine.run(compose_cfg(tmp_path, imagenet_root, *student), tmp_path / "writer")
    reader = engine.run(compose_cfg(tmp_path, imagenet_root, *student), tmp_path / "reader")
    info = json.loads((tmp_path / "reader" / "run_info.json").read_text())
    assert (info["teacher_cache/hits"], info["teacher_cache/misses"]) == (2, 0)
    assert trained(reader) == trained(live)


def train_py(tmp: Path, root: Path, run: str, *overrides: str, script: str = "train.py", env=None, nproc: int = 0):
    """`script` (train.py or a support/ runner) in a process of its own (support.forked), or under torchrun with
    nproc ranks; stdout and stderr together in .stdout."""
    args = [script, *RUN, f"dataset.source.root={root}", f"teacher_store={tmp / 'teachers'}",
            f"hydra.run.dir={tmp / run}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not nproc:
        return forked.run(args, REPO, env)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*torchrun, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600, env=env)


@pytest.mark.slow  # two train.py processes with DataLoader workers: ~30 s on 2 cores
def test_teacher_then_student_through_train_py_with_two_workers(imagenet_root, tmp_path):
    # resnet8 at width 0.25 on 64-px inputs: the shape whose NHWC backward corrupts the heap in torch 2.14 on the CPU
    # (kd/cpu_conv.py routes its strided 1x1 convolutions around the kernel), with the default channels_last=true.
    workers = ["dataset.source.num_workers=2", "dataset.source.image_size=64"]
    teacher = train_py(tmp_path, imagenet_root, "teacher", "phase=teacher", *workers)
    assert teacher.returncode == 0, teacher.stdout[-3000:]
    student = train_py(tmp_path, imagenet_root, "student", "phase=student", *workers)
    assert student.returncode == 0, student.stdout[-3000:]
    result = json.loads((tmp_path / "student" / "result.json").read_text())
    assert result["epochs"] == 2 and 0 <= result["test/acc1"] <= 100 and "test/agreement" in result
    assert result["config"]["dataset"]["source"]["image_size"] == 64
    info = json.loads((tmp_path / "student" / "run_info.json").read_text())
    assert info["teacher_cache/misses"] == 2  # the cache was written from the streamed epochs


PLAIN = ["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=3", "dataset.source.num_workers=2"]


@pytest.mark.slow  # three train.py processes: ~40 s
def test_a_killed_streaming_run_resumes_to_the_same_bits(imagenet_root, tmp_path):
    whole = train_py(tmp_path, imagenet_root, "whole", *PLAIN)
    assert whole.returncode == 0, whole.stdout[-3000:]
    killed = train_py(tmp_path, imagenet_root, "resumed", *PLAIN, script="tests/support/kill_runner.py",
                      env={"KD_KILL_AT": "step:2:1"})  # mid-epoch 2, its workers decoding
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    assert not (tmp_path / "resumed" / "result.json").exists()
    resumed = train_py(tmp_path, imagenet_root, "resumed", *PLAIN)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert json.loads((tmp_path / "resumed" / "run_info.json").read_text())["resumed_from_epoch"] == 1
    assert (tmp_path / "resumed" / "result.json").read_bytes() == (tmp_path / "whole" / "result.json").read_bytes()


@pytest.mark.slow  # torchrun, 2 gloo ranks with 2 workers each: ~40 s
def test_two_ranks_decode_each_sample_on_one_rank_and_evaluate_each_image_once(imagenet_root, tmp_path):
    logs = tmp_path / "decodes"
    logs.mkdir()
    proc = train_py(tmp_path, imagenet_root, "ddp", *PLAIN, "epochs=2", "batch_size=7", nproc=2,
                    script="tests/support/count_decodes.py", env={"KD_DECODE_LOG": str(logs)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert json.loads((tmp_path / "ddp" / "result.json").read_text())["world_size"] == 2
    decoded = {rank: [line.split() for line in (logs / f"rank{rank}.log").read_text().splitlines()] for rank in (0, 1)}
    source = data.imagenet(str(imagenet_root), image_size=32)
    n = len(source.train)
    for epoch in (1, 2):
        order = torch.randperm(n, generator=epoch_generator(0, epoch)).tolist()
        for rank in (0, 1):
            mine = [int(i) for split, e, i in decoded[rank] if split == "train" and int(e) == epoch]
            batches = [order[start:start + 7] for start in range(0, n, 7)]
            expected = [b[len(b) * rank // 2:len(b) * (rank + 1) // 2] for b in batches]
            assert sorted(mine) == sorted(i for share in expected for i in share)  # its shares, and only them
    test_counts = Counter((rank, int(i)) for rank in (0, 1) for split, _, i in decoded[rank] if split == "test")
    per_image = Counter(i for _, i in test_counts.elements())
    assert per_image == Counter({i: 2 for i in range(len(source.test))})  # every image once per evaluation (2 epochs)
    assert len({i for _, i in test_counts}) == len({key for key in test_counts})  # each image on one rank only
