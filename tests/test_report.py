"""kd.report on a real multirun (teacher, then 2 alphas x 2 temperatures x 2 seeds) and on hand-made sweeps."""
import csv
import json
import shutil
import statistics
from pathlib import Path

import matplotlib.figure
import matplotlib.image
import pytest

from kd import report
from support import forked, tree_state
from support.jobs import fake_config, fake_job, section

REPO = Path(__file__).resolve().parents[1]
# 16x16 digits, small CNNs, batch 128 and one thread keep 9 trainings within seconds; the pipeline is the same as at
# 32x32 (one thread: these models are too small to gain from two, and a second stalls when the CPU is shared).
TINY = ["experiment=quickstart", "teacher_recipe=student", "model@teacher=simple_cnn", "teacher.width=0.5",
        "model@student=simple_cnn", "student.width=0.25", "epochs=1", "batch_size=128",
        "++dataset.source.image_size=16", "logger.mode=disabled", "threads=1", "profile=false"]
SWEEP = ["loss.alpha=0,0.9", "loss.temperature=1,4", "seed=0,1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def train_py(*args: str) -> None:
    """train.py in a process of its own (support.forked)."""
    done = forked.run(["train.py", *args], REPO)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real teacher run, then a real student multirun of 8 jobs through train.py -m."""
    tmp = tmp_path_factory.mktemp("report")
    store = f"teacher_store={tmp / 'teachers'}"
    train_py(*TINY, "phase=teacher", store, f"hydra.run.dir={tmp / 'teacher'}")
    train_py("-m", *TINY, "phase=student", store, *SWEEP, f"hydra.sweep.dir={tmp / 'sweep'}")
    return tmp / "sweep"


@pytest.fixture(scope="module")
def out(sweep, tmp_path_factory) -> Path:
    """The report of the complete sweep, with a pivot and LaTeX."""
    out = tmp_path_factory.mktemp("out")
    assert report.main([str(sweep), "--out", str(out), "--latex", "--pivot", "loss.alpha", "loss.temperature"]) == 0
    return out


def results_by_setting(sweep: Path) -> dict[tuple[float, float], list[dict]]:
    """The result.json records, read directly, keyed by (alpha, temperature)."""
    by_setting: dict[tuple[float, float], list[dict]] = {}
    for path in sorted(sweep.rglob("result.json")):
        result = json.loads(path.read_text())
        loss = result["config"]["loss"]
        by_setting.setdefault((float(loss["alpha"]), float(loss["temperature"])), []).append(result)
    return by_setting


def csv_rows(path: Path) -> dict[tuple[float, float], dict[str, str]]:
    with path.open() as f:
        return {(float(r["loss.alpha"]), float(r["loss.temperature"])): r for r in csv.DictReader(f)}


def job_folder(sweep: Path, **values: str) -> Path:
    """The one job folder whose overrides (in its run.json) contain every key=value given (dots written as __)."""
    wanted = {f"{k.replace('__', '.')}={v}" for k, v in values.items()}
    (match,) = [p.parent for p in sweep.rglob("run.json") if wanted <= set(json.loads(p.read_text())["overrides"])]
    return match


def test_expected_jobs_are_the_grid(sweep):
    jobs = report.expected_jobs(sweep)
    assert len(jobs) == 8
    folders = {report.normalize(json.loads(p.read_text())["overrides"]) for p in sweep.rglob("run.json")}
    assert {report.normalize(job) for job in jobs} == folders
    assert sum("loss.alpha=0.9" in job and "seed=1" in job for job in jobs) == 2
    # Job folders are named by the swept keys alone; the constant overrides are in sweep.json.
    names = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert "loss.alpha=0.9,loss.temperature=4,seed=1" in names and len(names) == 8
    assert json.loads((sweep / "sweep.json").read_text())["fixed"]["phase"] == "student"


def test_table_matches_an_independent_computation(sweep, out):
    expected, table = results_by_setting(sweep), csv_rows(out / "report.csv")
    assert set(table) == set(expected) == {(a, t) for a in (0.0, 0.9) for t in (1.0, 4.0)}
    for setting, results in expected.items():
        row = table[setting]
        assert (int(row["n"]), int(row["n_expected"])) == (2, 2)
        for name, key in (("last", "test/acc1"), ("best", "test/acc1_best")):
            values = [r[key] for r in results]
            assert float(row[f"test_acc1_{name}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-9)
            assert float(row[f"test_acc1_{name}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
        assert float(row["params"]) == results[0]["params"]
        assert float(row["teacher_acc1"]) == pytest.approx(statistics.mean(r["teacher/acc1"] for r in results))
    for temperature in (1.0, 4.0):  # Δ: alpha 0.9 against alpha 0 at the same temperature
        kd, base = (statistics.mean(r["test/acc1"] for r in expected[(a, temperature)]) for a in (0.9, 0.0))
        assert float(table[(0.9, temperature)]["delta_last"]) == pytest.approx(kd - base, abs=1e-9)
        assert table[(0.0, temperature)]["delta_last"] == ""


def test_markdown_table_columns_and_cells(sweep, out):
    markdown = (out / "report.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| # |"))
    # alpha 0 is the baseline's, alpha 0.9 KD's: the method names them, and the settings line says alpha's value.
    assert "| method | loss.temperature |" in header and "loss.alpha" not in header
    assert "student.width" not in header and "seed" not in header and "logger" not in header
    assert "Method settings: CE (no teacher): loss.alpha=0; KD: loss.alpha=0.9." in markdown
    values = [r["test/acc1"] for r in results_by_setting(sweep)[(0.9, 4.0)]]
    cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    assert any(line.startswith("| ") and "| KD | 4 |" in line and cell in line for line in markdown.splitlines())
    assert "selected by test/acc1" in markdown
    assert "None: every expected job has a result.json." in section(markdown, "Missing or failed runs")


def test_pivot_equals_group_means(sweep, out):
    table = csv_rows(out / "report.csv")
    with (out / "pivot_loss.alpha_loss.temperature.csv").open() as f:
        pivot = {(float(r["loss.alpha"]), float(r["loss.temperature"])): r for r in csv.DictReader(f)}
    assert set(pivot) == set(table)
    for setting, results in results_by_setting(sweep).items():
        mean = statistics.mean(r["test/acc1"] for r in results)
        assert float(pivot[setting]["test_acc1_last_mean"]) == pytest.approx(mean, abs=1e-9)
        assert float(pivot[setting]["test_acc1_last_mean"]) == float(table[setting]["test_acc1_last_mean"])
    markdown = section((out / "report.md").read_text(), "Pivot: loss.alpha × loss.temperature")
    line = next(line for line in markdown.splitlines() if line.startswith("| 0.9 |"))
    assert f"{float(table[(0.9, 1.0)]['test_acc1_last_mean']):.2f} ± " in line.split("|")[2]


def test_latex_written(out):
    tex = (out / "report.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 2  # the table and the pivot
    assert r"$\pm$" in tex and r"loss.alpha" in tex and "±" not in tex


def test_plots_are_valid_pngs(out):
    markdown = (out / "report.md").read_text()
    for name in ("heatmap_alpha_temperature.png", "curves.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 0 and image.shape[1] > 0
        assert f"![{name}]({name})" in markdown
    assert not (out / "acc_vs_params.png").exists()  # one student width: nothing to plot against
    assert "acc_vs_params.png skipped" in markdown


def test_a_report_that_fails_while_writing_leaves_the_previous_files_whole(sweep, out, tmp_path, monkeypatch):
    """Every file is written atomically: a plot that fails half-written (a full disk) changes no file, where
    savefig into the file itself would have truncated the previous plot."""
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = tree_state(again)

    def half_written(figure, target, **options):
        target.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    options = report.Options(pivots=[("loss.alpha", "loss.temperature")], latex=True)
    with pytest.raises(OSError, match="No space left"):
        report.write_report([sweep], again, options)
    assert tree_state(again) == before


def test_deleted_result_is_listed_and_its_group_is_short(sweep, tmp_path, capsys):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    job = job_folder(copy, loss__alpha="0.9", loss__temperature="4", seed="1")
    (job / "result.json").unlink()
    assert report.main([str(copy)]) == 0
    assert "failed or unfinished" in capsys.readouterr().err
    problems = section((copy / "report.md").read_text(), "Missing or failed runs")
    assert f"`{job.name}`" in problems and "loss.alpha=0.9 loss.temperature=4 seed=1" in problems
    row = csv_rows(copy / "report.csv")[(0.9, 4.0)]
    assert (row["n"], row["n_expected"], row["test_acc1_last_std"]) == ("1", "2", "")
    other_seed = job_folder(copy, loss__alpha="0.9", loss__temperature="4", seed="0")
    assert float(row["test_acc1_last_mean"]) == json.loads((other_seed / "result.json").read_text())["test/acc1"]
    table_line = next(line for line in (copy / "report.md").read_text().splitlines() if "| KD | 4 |" in line)
    assert "| 1 of 2 |" in table_line


def test_removed_folders_are_missing_from_the_grid(sweep, tmp_path, capsys):
    copy = shutil.copytree(sweep, tmp_path / "sweep")
    shutil.rmtree(job_folder(copy, loss__alpha="0", loss__temperature="1", seed="0"))
    for seed in ("0", "1"):
        shutil.rmtree(job_folder(copy, loss__alpha="0.9", loss__temperature="1", seed=seed))
    assert report.main([str(copy)]) == 0
    assert capsys.readouterr().err.count("missing (job") == 3
    problems = section((copy / "report.md").read_text(), "Missing or failed runs")
    assert "loss.alpha=0 loss.temperature=1 seed=0 (no job folder" in problems
    assert "Settings with no finished run (no row in the table): loss.alpha=0.9 loss.temperature=1." in problems
    table = csv_rows(copy / "report.csv")
    assert (0.9, 1.0) not in table
    assert (table[(0.0, 1.0)]["n"], table[(0.0, 1.0)]["n_expected"]) == ("1", "2")


# ---------------------------------------------------------------- hand-made sweeps (no training)


@pytest.fixture
def ce_and_kd_sweep(tmp_path) -> Path:
    """CE and KD students at two widths; no multirun.yaml; KD at width 1 has one seed only."""
    ce = {"_target_": "kd.methods.base.CELoss", "label_smoothing": 0.0}
    kd = {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4}
    number = 0
    for name, loss in (("ce", ce), ("kd", kd)):
        for width, params in ((0.5, 1000), (1.0, 4000)):
            for seed in (0, 1) if (name, width) != ("kd", 1.0) else (0,):
                acc = 50 + 10 * width + 5 * (name == "kd") + seed
                fake_job(tmp_path / f"{number}_job", [f"loss={name}", f"student.width={width}", f"seed={seed}"],
                         fake_config(loss, width, seed, device=f"cuda:{seed}"), {"latency_ms": 2.0}, **{
                             "test/acc1": acc, "test/acc1_best": acc + 1, "params": params,
                             "flops_per_image": 3e6 * params / 1000})
                number += 1
    return tmp_path


def test_ce_baseline_sizes_and_extras(ce_and_kd_sweep):
    assert report.main([str(ce_and_kd_sweep), "--metric", "last"]) == 0
    with (ce_and_kd_sweep / "report.csv").open() as f:
        rows = {(r["method"], r["student.width"]): r for r in csv.DictReader(f)}
    ce = report.BASELINE
    assert set(rows) == {(m, w) for m in (ce, "KD") for w in ("0.5", "1.0")}  # device differs: still one group
    assert float(rows[("KD", "0.5")]["delta_last"]) == pytest.approx(60.5 - 55.5)
    assert float(rows[("KD", "1.0")]["delta_last"]) == pytest.approx(65 - 60.5)
    assert rows[("KD", "1.0")]["baseline_row"] == rows[(ce, "1.0")]["row"]
    markdown = (ce_and_kd_sweep / "report.md").read_text()
    kd_line = next(line for line in markdown.splitlines() if line.startswith(f"| {rows[('KD', '1.0')]['row']} |"))
    # The best mean is bold; the latency a job measured while training (run_info.json) is not a column.
    assert "| **65.00** |" in kd_line and "±" not in kd_line and "best" not in markdown.split("| # |")[1].split("\n")[0]
    assert "latency (ms)" not in markdown and "selected by val/acc1" in markdown
    for name in ("acc_vs_params.png", "acc_vs_flops.png", "curves.png"):
        assert (ce_and_kd_sweep / name).read_bytes()[:8] == PNG_SIGNATURE
        assert matplotlib.image.imread(ce_and_kd_sweep / name).size > 0
    assert "heatmap_alpha_temperature.png skipped" in markdown


def test_size_plot_draws_one_line_per_method_across_student_widths(tmp_path, monkeypatch):
    teacher = {"_target_": "kd.models.cifar_resnet.resnet20", "width": 1.0}
    losses = {"ce": {"_target_": "kd.methods.base.CELoss", "label_smoothing": 0.0},
              "kd": {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4}}
    for number, (name, width) in enumerate((n, w) for n in losses for w in (0.5, 1.0)):
        fake_job(tmp_path / f"{number}_job", [f"loss={name}", f"student.width={width}"],
                 fake_config(losses[name], width, 0, teacher=teacher), {},
                 **{"test/acc1": 60.0 + number, "test/acc1_best": 61.0, "params": 4000 * width})
    drawn = {}
    monkeypatch.setattr(report.plots, "lines", lambda series, xlabel, *args, **kwargs: drawn.setdefault(
        xlabel, [(s.label, len(s.x)) for s in series]))
    assert report.main([str(tmp_path), "--metric", "last"]) == 0
    assert sorted(drawn["parameters (log scale)"]) == [(f"{report.BASELINE} (baseline)", 2), ("KD", 2)]


def key(config: dict, linked: set = frozenset(), **result) -> dict:
    return report.group_key({"config": config, **result}, linked)


def test_group_key_drops_seed_and_bookkeeping_but_keeps_seed_links():
    one = fake_config({"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9}, 0.5, 0, teacher_seed=0, teacher_store="/a")
    two = fake_config({"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9}, 0.5, 1, teacher_seed=0, teacher_store="/b")
    assert key(one) == key({**two, "logger": {"mode": "online"}, "progress_bar": True})
    assert key(one)["method"] == "KD" and "seed" not in key(one)
    paired = fake_config({"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9}, 0.5, 1, teacher_seed=1)
    assert key(paired) != key(one)  # a different teacher is another experiment
    assert key(paired, {"teacher_seed"})["teacher_seed"] == "${seed}"
    teacher = {**one, "phase": "teacher", "teacher": {"_target_": "kd.models.cifar_resnet.resnet8"}}
    assert key(teacher) == key({**teacher, "student": {}, "loss": {"alpha": 0.0}})
    assert key(teacher)["method"] == "teacher (CE)"
    # The teacher's weights are part of the experiment; its path is not; a per-seed teacher follows the seed.
    by_path = {**one, "teacher_checkpoint": "/elsewhere/teacher.pt"}
    assert key(one, **{"teacher/sha256": "a" * 64}) == key(by_path, **{"teacher/sha256": "a" * 64})
    assert key(one, **{"teacher/sha256": "a" * 64}) != key(one, **{"teacher/sha256": "b" * 64})
    assert key(paired, {"teacher_seed"}, **{"teacher/sha256": "b" * 64})["teacher/sha256"] == "${seed}"


def test_bad_pivot_key_and_empty_folder_fail(ce_and_kd_sweep, tmp_path, capsys):
    assert report.main([str(ce_and_kd_sweep), "--pivot", "loss.alfa", "method"]) == 1
    assert "no such config key" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 1


def test_method_names_follow_the_papers_tables():
    ce = {"_target_": "kd.methods.base.CELoss", "weight": 1.0}
    feature = {"_target_": "kd.methods.fitnet.FitNetLoss", "weight": 100.0}
    crd = {"_target_": "kd.methods.crd.CRDLoss", "weight": 0.8}
    soft = {"_target_": "kd.methods.kd.SoftTargets", "weight": 9.0, "standardize": True}
    names = {
        "KD": {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9},
        "DKD-LS": {"_target_": "kd.methods.dkd.DKDLoss", "standardize": True},
        "FitNet": {"_target_": "kd.methods.base.Combined", "ce": ce, "fitnet": feature},
        "KD+CRD": {"_target_": "kd.methods.base.Combined", "ce": ce, "kd": {**soft, "standardize": False}, "crd": crd},
        "KD-LS": {"_target_": "kd.methods.base.Combined", "ce": ce, "kd": soft},
        "CE (no teacher)": {"_target_": "kd.methods.base.Combined", "ce": ce},
    }
    for name, loss in names.items():
        assert report.method_name({"phase": "student", "loss": loss}) == name
    for baseline in ({"_target_": "kd.methods.base.CELoss"}, {"_target_": "kd.methods.kd.KDLoss", "alpha": 0}):
        assert report.method_name({"phase": "student", "loss": baseline}) == "CE (no teacher)"


def test_method_by_pair_pivot_is_one_table(tmp_path):
    """A methods x pairs sweep: each method's own weights and each pair's models and DKD beta follow the pivoted
    keys, so they neither split the pivot into panels nor crowd the table with columns."""
    ce = {"_target_": "kd.methods.base.CELoss", "weight": 1.0}
    methods = {
        "kd": {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4},
        "dkd": {"_target_": "kd.methods.dkd.DKDLoss", "beta": None},  # beta: the pair's
        "fitnet": {"_target_": "kd.methods.base.Combined", "ce": ce,
                   "fitnet": {"_target_": "kd.methods.fitnet.FitNetLoss", "weight": 100.0}},
    }
    pairs = {"resnet56": ("resnet20", 2.0), "wrn_40_2": ("wrn_16_2", 6.0)}
    number = 0
    for method, loss in methods.items():
        for teacher, (student, beta) in pairs.items():
            for seed in (0, 1):
                pair_loss = {**loss, "beta": beta} if method == "dkd" else loss
                config = fake_config(pair_loss, 1.0, seed, teacher={"_target_": f"kd.models.zoo.{teacher}"},
                                     pair_hparams={"dkd_beta": beta})
                config["student"]["_target_"] = f"kd.models.zoo.{student}"
                accuracy = 60 + 5 * list(methods).index(method) + (teacher == "wrn_40_2") + seed
                fake_job(tmp_path / f"{number}_job", [f"loss={method}", f"experiment={teacher}", f"seed={seed}"],
                         config, **{"test/acc1": accuracy, "test/acc1_best": accuracy, "params": 1,
                                    "flops_per_image": 1})
                number += 1
    assert report.main([str(tmp_path), "--metric", "last", "--pivot", "method", "pair"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    pivot = section(markdown, "Pivot: method × pair (test top-1 last, %)")
    assert sum(line.startswith("| --- ") for line in pivot.splitlines()) == 1  # one panel
    assert "| method \\ pair | resnet56 -> resnet20 | wrn_40_2 -> wrn_16_2 |" in pivot
    # Each pair's best method is bold (rows of another student do not compete).
    assert "| DKD | 65.50 ± 0.71 | 66.50 ± 0.71 |" in pivot
    assert "| FitNet | **70.50 ± 0.71** | **71.50 ± 0.71** |" in pivot
    header = next(line for line in markdown.splitlines() if line.startswith("| # |"))
    # DKD's beta varies with the pair and the method together: it stays a column; nothing else of loss or pair.
    assert "| method | pair | loss.beta | test top-1" in header and "teacher." not in header
    assert "Fixed: phase=student, epochs=2." in markdown


def test_paper_figures_beside_ours(tmp_path):
    """--paper crd: every cell with a published figure shows ours at the paper's convention, the figure, the
    difference; the teacher row compares the measured teachers; the CSV holds the full-precision numbers."""
    kd_loss = {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4}
    for number, (alpha, seed, last) in enumerate(((0.9, 0, 69.0), (0.9, 1, 71.0), (0.0, 0, 68.5), (0.0, 1, 69.5))):
        config = fake_config({**kd_loss, "alpha": alpha}, 1.0, seed, teacher={"_target_": "kd.models.zoo.resnet56"})
        config["student"]["_target_"] = "kd.models.zoo.resnet20"
        fake_job(tmp_path / f"job{number}", [f"loss.alpha={alpha}", f"seed={seed}"], config,
                 **{"test/acc1": last, "test/acc1_best": last + 1, "teacher/acc1": 72.0 + seed})
    assert report.main([str(tmp_path), "--pivot", "method", "pair", "--paper", "crd"]) == 0
    section_text = section((tmp_path / "report.md").read_text(), "Beside Tian et al., ICLR 2020 (CRD)")
    # Without a recorded sha256 each run's teacher counts as a teacher of its own. RepDistiller README line 79.
    assert "| teacher | 72.50 ± 0.58 (n=4) / 72.34 (+0.16) |" in section_text
    assert "| KD | 70.00 ± 1.41 (n=2) / 70.66 (-0.66) |" in section_text  # line 80: the last epoch, as CRD reports
    assert "| CE (no teacher) | 69.00 ± 0.71 (n=2) / 69.06 (-0.06) |" in section_text
    assert "reports the **last** epoch" in section_text and "README.md line 80" in section_text
    assert "line 81" not in section_text  # only the sources of the figures shown
    with (tmp_path / "paper_crd.csv").open() as f:
        cells = {(r["method"], r["pair"]): r for r in csv.DictReader(f)}
    assert float(cells[("KD", "resnet56 -> resnet20")]["delta"]) == pytest.approx(70.0 - 70.66)
