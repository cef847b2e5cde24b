"""The fast paths: teacher-output cache (exact, keyed, bounded, shared by a sweep), precision and memory format
options, the image-folder decode cache, and the benchmark's command line."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize
from hydra.utils import instantiate

import kd.config  # noqa: F401  (registers the schema)
from kd import data, engine, hardware, loop, teacher_cache
from kd.config import Phase
from kd.teacher_cache import TOPK_GAP, EpochOutputs, StoredEpoch, TeacherCache
from support import forked
from support.reference import augment, batches
from tools import bench

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=resnet8", "model@student=simple_cnn",
        "student.width=0.25"]
TINY += ["epochs=2", "logger.mode=disabled", "profile=false", "threads=1"]


def compose_cfg(tmp_path: Path, *overrides: str):
    store = f"teacher_store={tmp_path / 'teachers'}"
    with initialize(version_base="1.3", config_path="../conf"):
        return compose("config", overrides=[*TINY, store, *overrides])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cache_teacher")
    return Path(engine.run(compose_cfg(tmp, "phase=teacher"), tmp / "run")["teacher_checkpoint"])


def student(tmp_path: Path, teacher: Path, name: str, *overrides: str) -> dict:
    """A student run's result.json merged with its run_info.json (where the cache's hits and misses are)."""
    cache = f"teacher_cache_dir={tmp_path / 'cache'}"
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}", cache, *overrides)
    result = engine.run(cfg, tmp_path / name)
    return {**result, **json.loads((tmp_path / name / "run_info.json").read_text())}


def trained(result: dict) -> dict:
    return {k: v for k, v in result.items() if k.startswith(("train/", "test/"))}


@pytest.fixture
def tf32_flags():
    """torch's TF32 flags, set back after the test to what they were before it (monkeypatch cannot set back
    torch.backends.cuda.matmul.allow_tf32, which its module computes: its teardown raises AttributeError)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    yield lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------------------
# teacher-output cache


def test_student_from_the_cache_is_bit_identical_to_the_live_teacher(teacher, tmp_path):
    live = student(tmp_path, teacher, "live", "teacher_cache=false")
    writer = student(tmp_path, teacher, "writer")  # fills the cache, running the teacher
    reader = student(tmp_path, teacher, "reader")  # reads every epoch from it
    assert (writer["teacher_cache/hits"], writer["teacher_cache/misses"]) == (0, 2)
    assert (reader["teacher_cache/hits"], reader["teacher_cache/misses"]) == (2, 0)
    assert trained(live) == trained(writer) == trained(reader)
    assert "teacher_cache/hits" not in live
    # Its disk use is reported: two epochs of float32 logits over the training split.
    n_train, classes = 1438, 10  # digits: 80% of 1797
    assert reader["teacher_cache/bytes"] >= 2 * n_train * classes * 4


def test_cache_hit_equals_the_live_teachers_outputs(teacher, tmp_path):
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}",
                      f"teacher_cache_dir={tmp_path / 'cache'}")
    job, _, _ = engine.set_up(cfg, [])
    loop.train_one_epoch(job, epoch=1)  # live: records the epoch
    stored = job.cache.load(1)
    live = []
    generator = data.epoch_generator(cfg.seed, 1)
    for batch in batches(job.data.train, cfg.batch_size, generator):
        views = augment(batch.images, job.data.crop_padding, job.data.hflip, generator)
        with torch.inference_mode():
            live.append(job.teacher(job.data.inputs(views)))
    assert torch.equal(stored.logits, torch.cat(live))


@pytest.mark.parametrize("change", ["seed=1", "batch_size=32", "dataset.hflip=true", "dataset.crop_padding=2",
                                    "dataset.val_fraction=0.1", "precision=bf16"])
def test_anything_that_changes_the_views_or_numerics_gets_its_own_entry(teacher, tmp_path, change):
    common = ["phase=student", f"teacher_checkpoint={teacher}", "teacher_acc_tolerance=100"]  # a 2-epoch teacher
    base, other = compose_cfg(tmp_path, *common), compose_cfg(tmp_path, *common, change)
    dirs = []
    for cfg in (base, other):
        job, _, _ = engine.set_up(cfg, [])
        dirs.append(job.cache.dir)
    assert dirs[0] != dirs[1]


def test_the_memory_layout_gets_its_own_entry(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "use_channels_last", lambda channels_last, device: channels_last)  # as on CUDA
    common = ["phase=student", f"teacher_checkpoint={teacher}", "teacher_acc_tolerance=100"]
    dirs = [engine.set_up(compose_cfg(tmp_path, *common, f"channels_last={flag}"), [])[0].cache.dir
            for flag in ("true", "false")]
    assert dirs[0] != dirs[1]


def test_an_fp32_gpu_run_keeps_apart_from_entries_computed_with_tf32(tmp_path, tf32_flags):
    """fp32 on a GPU computes without TF32 since hardware.set_tf32, so its key differs from earlier code's entries
    (TF32 convolutions); bf16 and CPU keys are unchanged. A stand-in job on "cuda": only the key is made here."""
    cfg = compose_cfg(tmp_path, "phase=student", "loss=kd")
    criterion, teacher = instantiate(cfg.loss), instantiate(cfg.teacher)  # the key names the teacher's model code

    def key(device: str, amp_dtype) -> dict:
        stand_in = SimpleNamespace(device=torch.device(device), channels_last=False, num_train=8,
                                   train_digest=lambda: "digest")
        job = SimpleNamespace(criterion=criterion, teacher=teacher, data=stand_in, amp_dtype=amp_dtype)
        return engine.open_teacher_cache(cfg, job, "sha256").key

    torch.backends.cudnn.allow_tf32 = True  # set back by tf32_flags
    hardware.set_tf32(None)  # as build_job does for an fp32 job
    assert key("cuda", None)["cudnn_tf32"] is False
    assert "cudnn_tf32" not in key("cuda", torch.bfloat16) and "cudnn_tf32" not in key("cpu", None)


def test_another_teacher_never_reads_this_teachers_entry(teacher, tmp_path):
    copy = tmp_path / "other" / "teacher.pt"
    copy.parent.mkdir()
    payload = torch.load(teacher, weights_only=True)
    payload["model"]["fc.bias"] += 1.0  # other weights, same architecture
    torch.save(payload, copy)
    dirs = []
    for path in (teacher, copy):
        cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={path}",
                          f"teacher_cache_dir={tmp_path / 'cache'}", "teacher_acc_tolerance=100")
        job, _, _ = engine.set_up(cfg, [])
        dirs.append(job.cache.dir)
    assert dirs[0] != dirs[1]


def test_no_cache_for_losses_without_teacher_or_with_teacher_features(teacher, tmp_path):
    for overrides in (["loss.alpha=0"], ["loss=fitnet"]):
        cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}", *overrides)
        job, _, _ = engine.set_up(cfg, [])
        assert job.cache is None


def test_damaged_cache_file_is_recomputed(teacher, tmp_path):
    first = student(tmp_path, teacher, "first")
    epoch_file = Path(first["teacher_cache/dir"]) / "epoch_0001.pt"
    epoch_file.write_bytes(b"not a tensor file")
    second = student(tmp_path, teacher, "second")
    assert (second["teacher_cache/hits"], second["teacher_cache/misses"], second["teacher_cache/rejected"]) == (1, 1, 1)
    assert trained(first) == trained(second)
    assert torch.load(epoch_file, weights_only=True)["logits"].shape == (1438, 10)


def test_cache_stays_within_its_bound(tmp_path):
    logits = EpochOutputs(10, logits=torch.randn(100, 10))
    probe = TeacherCache(tmp_path / "probe", {"teacher": "probe"}, (100, 10), "float32", max_bytes=1e9)
    probe.save(1, logits)
    epoch_bytes = probe.size_bytes()  # 4000 bytes of rows, plus the file's header, checksum and key.json
    bound = 2.5 * epoch_bytes
    old = TeacherCache(tmp_path, {"teacher": "old"}, (100, 10), "float32", max_bytes=bound)
    old.save(1, logits)
    old.save(2, logits)
    new = TeacherCache(tmp_path, {"teacher": "new"}, (100, 10), "float32", max_bytes=bound)
    new.save(1, logits)  # over the bound in all: the least recently used other entry goes
    assert not old.dir.exists() and new.dir.exists()
    new.save(2, logits)
    new.save(3, logits)  # would exceed the bound on its own: not stored, the run goes on live
    assert new.full and not (new.dir / "epoch_0003.pt").exists()
    assert torch.equal(new.load(2).logits, logits.logits) and new.load(3) is None


def test_half_precision_storage_halves_the_files(tmp_path):
    logits = torch.randn(100, 10)
    cache = TeacherCache(tmp_path, {"k": 1}, (100, 10), "bfloat16", max_bytes=1e9)
    cache.save(1, EpochOutputs(10, logits=logits))
    assert torch.equal(cache.load(1).logits, logits.bfloat16().float())
    with pytest.raises(ValueError, match="teacher_cache_dtype=float64"):
        TeacherCache(tmp_path, {"k": 1}, (100, 10), "float64", max_bytes=1e9)


def test_top_k_storage_keeps_each_views_k_largest_logits_and_renormalises(tmp_path):
    logits = torch.randn(50, 100, generator=torch.Generator().manual_seed(0)) * 3
    cache = TeacherCache(tmp_path, {"k": 1}, (50, 100), "float32", max_bytes=1e9, top_k=5)
    recording = cache.empty(torch.device("cpu"))
    recording.write(slice(0, 50), logits)
    cache.save(1, recording)
    restored = cache.load(1).rows(slice(10, 20))
    values, indices = logits[10:20].topk(5, dim=1)
    assert torch.equal(restored.gather(1, indices), values)  # the top 5 exactly; the rest TOPK_GAP below the 5th
    assert torch.equal(restored.topk(6, dim=1).values[:, 5], values[:, 4] - TOPK_GAP)
    for temperature in (1.0, 4.0):  # softmax(z / T): the top 5's probabilities renormalised, 0 elsewhere
        p = torch.softmax(restored / temperature, dim=1)
        expected = torch.zeros_like(p).scatter_(1, indices, torch.softmax(values / temperature, dim=1))
        assert torch.allclose(p, expected, atol=1e-7) and (p == 0).sum() == 10 * 95
    dense = TeacherCache(tmp_path, {"k": 1}, (50, 100), "float32", max_bytes=1e9)
    dense.save(1, EpochOutputs(100, logits=logits))
    assert cache.dir != dense.dir and cache.size_bytes() < dense.size_bytes() / 5  # 5 values + 5 int16 of 100


@pytest.fixture(params=["on the CPU (views)", "copied chunk by chunk"])
def streamed(request, monkeypatch):
    """StoredEpoch and RecordedEpoch as a CPU run uses them (the host rows themselves), and with their device path's
    chunk copies made on the CPU (synchronous: the CUDA-only pinned memory, non_blocking copies and event aside)."""
    if request.param == "copied chunk by chunk":
        monkeypatch.setattr(teacher_cache, "_shares_host", lambda device: False)
    monkeypatch.setattr(teacher_cache, "STREAM_BYTES", 3 * 7 * 40)  # 3 batches of 7 rows of 10 float32 per chunk


@pytest.mark.parametrize("top_k", [None, 3])
def test_a_stored_epoch_read_in_chunks_gives_every_step_its_rows_bit_for_bit(streamed, top_k):
    """A step's rows from StoredEpoch equal the whole epoch's (EpochOutputs.rows); at most two chunks (the step's
    and the next) are held; rows across two chunks, which no step asks for, are right too."""
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    whole = EpochOutputs.empty(50, 10, top_k, torch.device("cpu"))
    whole.write(slice(0, 50), logits)
    stored = StoredEpoch(whole, torch.device("cpu"), batch_size=7)
    assert stored.chunk == 21  # 3 batches: 840 bytes over 7 rows of 40 bytes (dense) or 36 (top 3: 4 + 8 each)
    for start in range(0, 50, 7):  # the epoch's steps: 7 full batches and one of 1
        rows = slice(start, min(start + 7, 50))
        assert torch.equal(stored.rows(rows), whole.rows(rows))
        assert len(stored.chunks) <= 2 and min(stored.chunks) == start // stored.chunk
    assert torch.equal(stored.rows(slice(5, 30)), whole.rows(slice(5, 30)))


@pytest.mark.parametrize("top_k", [None, 3])
def test_a_recorded_epoch_in_chunks_holds_the_rows_written_at_once(streamed, top_k):
    """Rows written step by step through RecordedEpoch (full chunks copied as they fill, the last one by outputs())
    are bit for bit those of one EpochOutputs written directly, as the cache held them before the chunks."""
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    expected = EpochOutputs.empty(50, 10, top_k, torch.device("cpu"))
    expected.write(slice(0, 50), logits)
    cache = TeacherCache(Path("unused"), {"k": 1}, (50, 10), "float32", max_bytes=1e9, top_k=top_k)
    recording = cache.recorder(torch.device("cpu"), batch_size=7)
    for start in range(0, 50, 7):
        rows = slice(start, min(start + 7, 50))
        recording.write(rows, logits[rows])
        assert len(recording.chunks) <= 1  # a full chunk leaves as it fills
    recording.write(slice(5, 30), logits[5:30])  # across chunks: no step does this; the same rows again
    outputs = recording.outputs()
    assert not recording.chunks and outputs.tensors().keys() == expected.tensors().keys()
    for name, tensor in expected.tensors().items():
        assert torch.equal(outputs.tensors()[name], tensor), name
    partial = cache.recorder(torch.device("cpu"), batch_size=7)
    partial.write(slice(0, 7), logits[:7])  # a chunk never filled: outputs() copies what it holds
    for name, tensor in partial.outputs().part(slice(0, 7)).tensors().items():
        assert torch.equal(tensor, expected.part(slice(0, 7)).tensors()[name]), name


def test_a_top_k_cache_of_every_class_is_the_live_teacher(teacher, tmp_path):
    live = student(tmp_path, teacher, "live", "teacher_cache=false")
    student(tmp_path, teacher, "writer", "teacher_cache_topk=10")
    reader = student(tmp_path, teacher, "reader", "teacher_cache_topk=10")  # digits: 10 classes
    assert reader["teacher_cache/hits"] == 2 and trained(reader) == trained(live)
    approximate = student(tmp_path, teacher, "top3", "teacher_cache_topk=3")
    assert approximate["teacher_cache/misses"] == 2  # another entry: the key holds k


@pytest.mark.slow
def test_sweep_of_two_students_with_the_cache_matches_the_sweep_without(teacher, tmp_path):
    results = {}
    for cache in ("true", "false"):
        args = ["train.py", "-m", *TINY, "phase=student", f"teacher_checkpoint={teacher}", "loss.temperature=2,4",
                f"teacher_cache={cache}", f"teacher_cache_dir={tmp_path / 'cache'}",
                f"hydra.sweep.dir={tmp_path / cache}"]
        proc = forked.run(args, REPO)  # train.py -m in a process of its own
        assert proc.returncode == 0, proc.stdout
        results[cache] = [{**json.loads(p.read_text()), **json.loads((p.parent / "run_info.json").read_text())}
                          for p in sorted((tmp_path / cache).glob("*/result.json"))]
    with_cache, without = results["true"], results["false"]
    assert len(with_cache) == len(without) == 2
    # The second job of the cached sweep reads the first job's teacher outputs.
    assert [r["teacher_cache/hits"] for r in with_cache] == [0, 2]
    assert [trained(r) for r in with_cache] == [trained(r) for r in without]


# ---------------------------------------------------------------------------------------------------------------
# precision, memory format, compile


@pytest.mark.parametrize("capability, expected", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                                  ((7, 5), torch.float16), ((7, 0), torch.float16)])
def test_auto_precision_is_bf16_from_capability_8_and_fp16_below(capability, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)  # H100/A100, T4/V100
    assert hardware.resolve_precision("auto", torch.device("cuda")) is expected
    assert hardware.resolve_precision("auto", torch.device("cpu")) is None
    assert hardware.resolve_precision("fp16", torch.device("cpu")) is torch.float16
    with pytest.raises(ValueError, match="precision=fp8"):
        hardware.resolve_precision("fp8", torch.device("cpu"))


def test_a_resume_keeps_the_precision_its_checkpoint_was_trained_in(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.job_precision("auto", cpu, None) is None
    assert hardware.job_precision("auto", cpu, "bf16") is torch.bfloat16  # trained in bf16 on a GPU, resumed here
    assert hardware.job_precision("bf16", cpu, "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match=r"last\.pt was trained in bf16, and precision=fp32 would go on in another "
                                         r"precision: resume with precision=bf16 \(or auto\)"):
        hardware.job_precision("fp32", cpu, "bf16")
    # End to end: a bf16 run interrupted after its first epoch resumes in bf16 under precision=auto on this CPU.
    real_run_epoch = engine.run_epoch

    def stop_at_epoch_two(job, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return real_run_epoch(job, epoch)

    student = ["phase=student", "loss=ce", "teacher_checkpoint=none", "epochs=2", "profile=false"]
    monkeypatch.setattr(engine, "run_epoch", stop_at_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        engine.run(compose_cfg(tmp_path, *student, "precision=bf16"), tmp_path / "run")
    monkeypatch.setattr(engine, "run_epoch", real_run_epoch)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["precision"] == "bf16"
    with pytest.raises(ValueError, match="run.json was written by another config"):  # the config says bf16
        engine.run(compose_cfg(tmp_path, *student, "precision=fp32"), tmp_path / "run")
    seen = []
    monkeypatch.setattr(engine, "run_epoch",
                        lambda job, epoch: seen.append(job.amp_dtype) or real_run_epoch(job, epoch))
    engine.run(compose_cfg(tmp_path, *student, "precision=bf16"), tmp_path / "run")
    assert seen == [torch.bfloat16]


def test_fp32_jobs_run_without_tf32_and_bf16_jobs_with_torchs_settings(tmp_path, tf32_flags):
    """build_job sets torch's TF32 flags for every job (hardware.set_tf32), whatever the job before it left. Only the
    flags are checked: no GPU here to show the numbers they give."""
    cpu, common = torch.device("cpu"), ["phase=student", "loss=ce", "teacher_checkpoint=none"]
    fp32, bf16 = (compose_cfg(tmp_path, *common, f"precision={name}") for name in ("fp32", "bf16"))
    loaded = engine.load_data(fp32.dataset, cpu)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True  # as a job before may leave them
    engine.build_job(fp32, Phase.student, instantiate(fp32.loss), loaded, cpu)
    assert tf32_flags() == (False, False)
    engine.build_job(bf16, Phase.student, instantiate(bf16.loss), loaded, cpu)  # the next job of a multirun
    assert tf32_flags() == hardware.TORCH_TF32 == (True, False)  # torch's defaults: TF32 convolutions, fp32 matmuls


def test_compile_uses_static_shapes_and_cuda_graph_modes_need_a_gpu(teacher, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or fn)
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}", "compile=true")
    engine.set_up(cfg, [])
    assert calls == [{"dynamic": False, "mode": "default"}]  # the shorter last batch gets a graph of its own
    for mode in ("reduce-overhead", "max-autotune"):
        cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}", "compile=true",
                          f"compile_mode={mode}")
        with pytest.raises(ValueError, match=f"compile_mode={mode} captures CUDA graphs, which need a CUDA device"):
            engine.set_up(cfg, [])
    with pytest.raises(ValueError, match="compile_mode=fast: must be one of default, reduce-overhead"):
        engine.run(compose_cfg(tmp_path, "compile_mode=fast"), tmp_path / "run")


def test_each_rank_takes_its_gpu_modulo_the_visible_ones_and_both_backends(monkeypatch):
    from kd import distributed

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM shows each task its one GPU
    assert distributed.local_device_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device_index() == 3
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.setdefault("device", index))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    distributed.init_from_env()
    assert calls == {"device": 3, "backend": "cpu:gloo,cuda:nccl"}


def test_ddp_does_not_broadcast_buffers_every_forward(teacher, tmp_path, monkeypatch):
    from kd import distributed, loop

    made = []
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}")
    job, _, _ = engine.set_up(cfg, [])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, **kwargs: made.append(kwargs) or model)
    loop.training_forward(job, None)
    assert made and all(kwargs["broadcast_buffers"] is False for kwargs in made)


def test_bf16_trains_close_to_fp32(teacher, tmp_path):
    fp32 = student(tmp_path, teacher, "fp32", "epochs=1")
    bf16 = student(tmp_path, teacher, "bf16", "epochs=1", "precision=bf16", "teacher_acc_tolerance=100")
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.05)


def test_channels_last_applies_on_the_cpu_too(teacher, tmp_path):
    """Strided 1x1 convolutions are routed around torch 2.14's crashing CPU NHWC backward (tests/test_cpu_conv.py)."""
    job, _, _ = engine.set_up(compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}",
                                          "channels_last=true"), [])
    assert job.data.channels_last
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in job.model.parameters() if p.dim() == 4)


def test_compile_refuses_feature_losses(teacher, tmp_path):
    cfg = compose_cfg(tmp_path, "phase=student", f"teacher_checkpoint={teacher}", "loss=at", "compile=true")
    with pytest.raises(ValueError, match="compile=true with a loss that reads features"):
        engine.run(cfg, tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# image-folder decode cache


def write_tree(root: Path) -> None:
    from PIL import Image

    for part in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            (root / part / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), (label * 100 + i, 7, 9)).save(root / part / name / f"{i}.png")


def test_image_folder_cache_is_built_once_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    root, cache = tmp_path / "tree", tmp_path / "cache"
    write_tree(root)
    first = data.image_folder(str(root), cache_dir=str(cache))
    assert len(list(cache.glob("*.pt"))) == 1
    decoded = []
    real_decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: decoded.append(a) or real_decode(*a))
    again = data.image_folder(str(root), cache_dir=str(cache))
    assert decoded == []  # served from the cache
    assert torch.equal(again.train.images, first.train.images) and again.classes == first.classes
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 255, 255)).save(root / "train" / "cat" / "3.png")  # the tree changes
    changed = data.image_folder(str(root), cache_dir=str(cache))
    assert len(decoded) == 1 and len(changed.train) == len(first.train) + 1
    assert torch.equal(changed.train.images, data.image_folder(str(root)).train.images)


# ---------------------------------------------------------------------------------------------------------------
# benchmark


def test_bench_runs_and_writes_its_figures(tmp_path, monkeypatch):
    # Every teacher-cache write and read, marked by whether it happened inside the timed rounds.
    timing, saves, loads = [], [], []
    real_rounds, real_save, real_load = bench.timed_rounds, TeacherCache.save, TeacherCache.load

    def rounds(variants, windows, device):
        timing.append(len(variants) == len(bench.VARIANT_FLOPS))  # the variants' rounds, not the matmul ceiling's
        try:
            return real_rounds(variants, windows, device)
        finally:
            timing.pop()

    def load(cache, epoch):
        logits = real_load(cache, epoch)
        loads.append((any(timing), logits is not None))
        return logits

    monkeypatch.setattr(bench, "timed_rounds", rounds)
    monkeypatch.setattr(TeacherCache, "save", lambda cache, *args: saves.append(any(timing)) or real_save(cache, *args))
    monkeypatch.setattr(TeacherCache, "load", load)
    out = tmp_path / "bench.json"
    bench.main(["--teacher", "resnet8", "--student", "resnet8", "--window-steps", "1", "--windows", "1",
                "--workers", "0", "--num-classes", "10", "--json", str(out), "threads=1"])
    figures = json.loads(out.read_text())
    for name in ("a_reference", "b_engine", "c_engine_cached", "d_engine_eval"):
        assert figures[name]["images_per_s"] > 0 and 0 < figures[name]["fraction_of_ceiling"] < 2
        assert figures[name]["steps_per_s"] == pytest.approx(figures[name]["images_per_s"] / 64)
    # The cache is filled before the rounds (one file per epoch), and (c) reads every epoch of the rounds from it.
    assert saves == [False, False]
    assert [hit for timed, hit in loads if timed] == [True, True]
    assert figures["config"]["window_steps"] == 1 and "bf16_peak_gflops" not in figures  # the peak: CUDA only
    assert figures["b_engine"]["speedup_vs_reference"] == pytest.approx(
        figures["b_engine"]["images_per_s"] / figures["a_reference"]["images_per_s"])
    assert figures["matmul_ceiling_gflops"] > 0
    # (d): the student's evaluation of the same images, forward only, beside (b)'s training rate.
    assert figures["config"]["eval_batch_size"] == 512 and figures["d_engine_eval"]["vs_training"] == pytest.approx(
        figures["d_engine_eval"]["images_per_s"] / figures["b_engine"]["images_per_s"])


def test_bench_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--batch-size", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--window-steps", "0"])


def test_topk_benchmark_measures_the_kd_terms_error_and_none_at_k_equal_classes(teacher, capsys):
    tiny = [o for o in TINY if not o.startswith(("epochs", "logger", "profile"))]
    result = bench.main(["--topk", str(teacher), *tiny, "--k", "1", "10", "--temperature", "4"])
    by_k = {row["k"]: row for row in result["rows"]}
    assert result["classes"] == 10 and result["images"] == 359
    assert by_k[10]["relative_error"] == 0 and by_k[10]["mass_outside_top_k"] == pytest.approx(0, abs=1e-6)
    assert by_k[1]["relative_error"] > 0 and 0 < by_k[1]["mass_outside_top_k"] < 1
    assert "| 4 | 1 |" in capsys.readouterr().out


def test_topk_benchmark_refuses_k_below_1_before_loading_anything(monkeypatch, capsys):
    monkeypatch.setattr(engine, "load_data", lambda *a, **k: pytest.fail("data loaded before the check"))
    with pytest.raises(SystemExit):
        bench.main(["--topk", "no_such_teacher.pt", "--k", "0"])
    assert "k must be at least 1" in capsys.readouterr().err


def test_evaluation_runs_a_batchnorm_folded_copy_with_the_same_logits(tmp_path, monkeypatch):
    """loop.predict evaluates a copy with each BatchNorm folded into its convolution (a quarter of the CPU's
    evaluation time): the same logits to float32 rounding, and the trained model itself untouched."""
    cfg = compose_cfg(tmp_path, "phase=teacher")
    data = engine.load_data(cfg.dataset, torch.device("cpu"), channels_last=True)
    torch.manual_seed(0)
    model = instantiate(cfg.teacher).to(memory_format=torch.channels_last)  # resnet8
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        expected = torch.cat([model.eval()(data.inputs(views)) for views in data.evaluation("test", 128)])
    evaluated, real_folded = [], loop.folded
    monkeypatch.setattr(loop, "folded", lambda m: evaluated.append(real_folded(m)) or evaluated[-1])
    logits = loop.predict(model.train(), data, "test", 128)
    assert len(evaluated) == 1 and evaluated[0] is not model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in evaluated[0].modules())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert model.training and all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
