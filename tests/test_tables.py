"""The CRD paper's tables as one sweep each (sweep=crd_table1, crd_table2), their cost logged before any job, and
kd.report --paper in the paper's layout: methods as rows, pairs as columns, each run counted once, across folders
too."""
import csv
import json
import logging
import math
import statistics
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

import hydra_plugins.kd_grid_sweeper
import kd.config  # noqa: F401  (registers the schema)
from kd import engine, fileio, profiling, published, records, report, sweep, sweep_cost, teachers
from support import tree_state
from support.jobs import fake_config, fake_job, section

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
# The acceptance table at test scale: 8x8 digits, one epoch, no W&B; the measured teacher is a random network, so its
# accuracy is far from the figure its file records (teacher_acc_tolerance would warn).
SCALE = ["dataset=digits", "++dataset.source.image_size=8", "epochs=1", "batch_size=256", "logger.mode=disabled",
         "profile=false", "threads=1", "teacher_acc_tolerance=100"]
TABLE1_ROWS = ["teacher", "CE (no teacher)", "KD", "FitNet", "AT", "SP", "CC", "VID", "RKD", "PKT", "AB", "FT", "FSP",
               "NST", "CRD", "KD+CRD"]
TABLE1_PAIRS = ["wrn_40_2 -> wrn_16_2", "wrn_40_2 -> wrn_40_1", "resnet56 -> resnet20", "resnet110 -> resnet20",
                "resnet110 -> resnet32", "resnet32x4 -> resnet8x4", "vgg13 -> vgg8"]


def composed(*overrides: str):
    """The sweep config as SweepChecks receives it (with its hydra node)."""
    return compose("config", overrides=list(overrides), return_hydra_config=True)


def table_lines(markdown: str, heading: str) -> list[list[str]]:
    """The rows of the first Markdown table under a heading, as lists of cells (the rule line left out)."""
    lines = [line for line in section(markdown, heading).splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines if not line.startswith("| ---")]


# ---------------------------------------------------------------------------------------------------------------
# the sweeps


@pytest.mark.parametrize("name, pairs, rows, runs", [("crd_table1", 7, 15, 520), ("crd_table2", 6, 14, 420)])
def test_each_table_is_one_sweep_of_every_row_and_five_seeds_into_one_folder(name, pairs, rows, runs):
    preset = OmegaConf.load(CONF / "sweep" / f"{name}.yaml")
    params = preset.hydra.sweeper.params
    assert preset.hydra.sweep.dir == f"outputs/tables/{name}"
    assert str(params.seed) == "0,1,2,3,4"  # the DKD paper's 5 runs (sources in crd_table1.yaml)
    losses = str(params.loss).split(",")
    assert (len(str(params.experiment).split(",")), len(losses)) == (pairs, rows)
    paper = published.load("crd")
    table = "Table 1 (same architecture)" if name == "crd_table1" else "Table 2 (different architectures)"
    wanted = {f.method for figs in paper.figures.values() for f in figs if f.table == table} - {"teacher"}
    names = {report.method_name({"phase": "student", "loss": OmegaConf.to_container(
        OmegaConf.load(CONF / "loss" / f"{loss}.yaml"))}) for loss in losses}
    assert {published.REPORT_NAMES.get(n, n) for n in names} == wanted  # every row of the paper's table, no other
    with initialize(version_base="1.3", config_path="../conf"):
        record = sweep.sweep_record(composed(f"sweep={name}"))
    assert len(record["grid"]) == runs
    fsp_on_narrower = [job for job in record["grid"] if {"experiment=crd_wrn_40_2_wrn_40_1", "loss=fsp"} <= set(job)]
    assert fsp_on_narrower == [] and len({tuple(job) for job in record["grid"]}) == runs


def test_the_grid_sweeper_leaves_out_the_excluded_jobs_in_the_basic_sweepers_order():
    parsed = OverridesParser.create().parse_overrides(["a=1,2", "b=x,y", "c=3"])
    with initialize(version_base="1.3", config_path="../conf"):
        # Hydra's plugin scan executes the plugin modules again: the class it found is the module's at this point.
        GridSweeper = hydra_plugins.kd_grid_sweeper.GridSweeper
    sweeper = GridSweeper(max_batch_size=2, params=None, exclude=[{"a": 2, "b": "x"}])
    batches = sweeper.split_arguments(parsed, 2)
    assert batches == [[["a=1", "b=x", "c=3"], ["a=1", "b=y", "c=3"]], [["a=2", "b=y", "c=3"]]]
    with pytest.raises(ValueError, match=r"hydra.sweeper.exclude: 'a=2' is not a mapping of swept keys"):
        GridSweeper(max_batch_size=None, exclude=["a=2"])


def test_the_hook_logs_the_cost_and_records_the_exclusions_and_refuses_a_relaunch_that_adds_one(tmp_path, caplog):
    """SweepChecks before any job: the line with runs, teachers and GPU-hours; sweep.json with the exclusions; a
    relaunch that would exclude more jobs (drop them from the sweep) is refused with nothing on disk changed."""
    folder = tmp_path / "sweep"
    overrides = ["sweep=crd_table1_quick", f"hydra.sweep.dir={folder}", f"teacher_store={tmp_path / 'store'}",
                 "hydra.sweeper.params.experiment='crd_resnet56_resnet20,crd_wrn_40_2_wrn_40_1'",
                 "hydra.sweeper.params.loss='ce,fsp'", "hydra.sweeper.params.seed=0"]
    caplog.set_level(logging.INFO, logger="kd.sweep")
    with initialize(version_base="1.3", config_path="../conf"):
        sweep.SweepChecks().on_multirun_start(config=composed(*overrides))
        recorded = json.loads((folder / "sweep.json").read_text())
        assert recorded["exclude"] == [{"experiment": "crd_wrn_40_2_wrn_40_1", "loss": "fsp"}]
        assert len(recorded["grid"]) == 3  # 2 pairs x 2 losses, less FSP on the narrower student
        (line,) = [r.getMessage() for r in caplog.records if "GPU-hours" in r.getMessage()]
        assert line.startswith(f"{folder}: 3 runs (1 excluded by hydra.sweeper.exclude), 2 teachers to train first: ")
        assert "at an assumed 10 TFLOP/s achieved" in line
        before = tree_state(folder)
        more = [*overrides, "hydra.sweeper.exclude=[{experiment:crd_resnet56_resnet20,loss:fsp}]"]
        with pytest.raises(SystemExit):
            sweep.SweepChecks().on_multirun_start(config=composed(*more))
    assert tree_state(folder) == before
    assert "exclude: adds {'experiment': 'crd_resnet56_resnet20', 'loss': 'fsp'} (drops jobs)" in caplog.text


def test_a_command_line_value_replaces_the_presets_swept_values_in_the_record_and_the_count():
    with initialize(version_base="1.3", config_path="../conf"):
        config = composed("sweep=crd_table1_quick", "experiment=crd_resnet56_resnet20", "seed=0")
        record = sweep.sweep_record(config)
    assert set(record["swept"]) == {"loss"} and record["fixed"]["experiment"] == "crd_resnet56_resnet20"
    assert len(record["grid"]) == 3 == math.prod(len(values) for values in record["swept"].values())


# ---------------------------------------------------------------------------------------------------------------
# the cost


def test_the_cost_is_counted_flops_over_the_jobs_and_the_teachers_to_train(tmp_path):
    """crd_table1_quick, independently: each job's epochs x training images x (3 x student + teacher forward FLOPs,
    counted as every run counts its own), the baseline (CE) without the teacher; each missing teacher once."""
    with initialize(version_base="1.3", config_path="../conf"):
        config = composed("sweep=crd_table1_quick", f"teacher_store={tmp_path / 'store'}")
        grid = sweep.sweep_record(config)["grid"]
        flops, to_train = sweep_cost.sweep_flops(config, grid)
        job = compose("config", overrides=["sweep=crd_table1_quick", "experiment=crd_resnet56_resnet20",
                                           f"teacher_store={tmp_path / 'store'}"])
    images = 1_797 - round(1_797 * 0.2)  # digits' training split
    counted = {}
    for name in ("resnet56", "resnet20", "wrn_40_2", "wrn_16_2"):
        node = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{name}.yaml"), {"num_classes": 10})
        counted[name] = profiling.forward_flops(instantiate(node), (3, 32, 32), torch.device("cpu"))
    expected = 0
    for teacher, student in (("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2")):
        # ce, kd, crd at 2 seeds: the baseline never runs the teacher.
        expected += 2 * 12 * images * (3 * 3 * counted[student] + 2 * counted[teacher])
    assert flops == pytest.approx(expected, rel=1e-9)
    assert sorted(to_train.values()) == pytest.approx(sorted(12 * images * 3 * counted[t] for t in ("resnet56",
                                                                                                  "wrn_40_2")))
    assert str(teachers.entry_dir(job, job.teacher_seed)) in to_train  # the entry the runs will look up


def test_the_jobs_configs_built_from_one_composition_per_value_equal_hydras(tmp_path):
    """Jobs of a table, and of a sweep whose two keys change one node (the experiment sets the MobileNetV2 student's
    optimizer.lr, and optimizer= replaces the node: composed whole), against Hydra's composition of each job."""
    with initialize(version_base="1.3", config_path="../conf"):
        for overrides in (["sweep=crd_table1", "hydra.sweeper.params.seed='3,4'"],
                          ["sweep=crd_table1", "hydra.sweeper.params.experiment='crd_resnet56_resnet20,"
                           "crd_vgg13_mobilenetv2'", "hydra.sweeper.params.loss=kd", "hydra.sweeper.params.seed=0",
                           "+hydra.sweeper.params.optimizer='sgd,adamw'"]):
            config = composed(*overrides)
            grid = sweep.sweep_record(config)["grid"]
            picked = sorted({0, len(grid) // 2, len(grid) - 1})
            trees = sweep_cost.job_trees(config, [grid[i] for i in picked])
            for i, tree in zip(picked, trees):
                hydras = sweep_cost.plain(sweep_cost.compose(config, list(grid[i])))
                assert records.plain_config(sweep_cost.resolved(tree)) == records.plain_config(
                    sweep_cost.resolved(hydras)), grid[i]
    assert sweep_cost.merge({"a": {"b": 1}}, [{"a": ("node", {"b": 2})}, {"a": ("node", {"b": 3})}]) is None


# ---------------------------------------------------------------------------------------------------------------
# the report: one table, each run once


def paper_job(folder: Path, loss: dict, pair: tuple[str, str], seed: int, last: float, **extra) -> None:
    """A finished job of the paper's setting (CIFAR-100, 240 epochs) whose teacher is the pair's (one sha256)."""
    config = fake_config(loss, 1.0, seed, teacher={"_target_": f"kd.models.cifar_resnet.{pair[0]}", "width": 1.0},
                         dataset={"name": "cifar100"})
    config.update(epochs=240, student={"_target_": f"kd.models.cifar_resnet.{pair[1]}", "width": 1.0})
    fake_job(folder, [f"loss={loss['_target_']}", f"experiment={pair[0]}_{pair[1]}", f"seed={seed}"], config,
             **{"test/acc1": last, "test/acc1_best": last + 1, "teacher/acc1": 72.0, "teacher/sha256": pair[0],
                **extra})


KD = {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4}
CE = {"_target_": "kd.methods.base.CELoss"}
PAIR, OTHER = ("resnet56", "resnet20"), ("resnet110", "resnet32")


def test_disjoint_folders_report_as_one_table_and_a_run_in_two_folders_is_refused(tmp_path, capsys):
    for seed, last in enumerate((70.0, 71.0)):
        paper_job(tmp_path / "a" / f"kd{seed}", KD, PAIR, seed, last)
        paper_job(tmp_path / "b" / f"ce{seed}", CE, PAIR, seed, last - 2)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--paper", "crd", "--out", str(tmp_path)]) == 0
    rows = table_lines((tmp_path / "report.md").read_text(), "Beside Tian et al., ICLR 2020 (CRD)")
    assert rows[0] == ["method \\ pair", "resnet56 -> resnet20"]
    assert rows[1:] == [["teacher", "72.00 (n=1) / 72.34 (-0.34)"], ["CE (no teacher)", "68.50 ± 0.71 (n=2) / 69.06 "
                        "(-0.56)"], ["KD", "70.50 ± 0.71 (n=2) / 70.66 (-0.16)"]]
    # The same folder twice, or a folder inside another: each job once.
    assert report.main([str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "a" / "kd0"), "--out",
                        str(tmp_path)]) == 0
    with (tmp_path / "report.csv").open() as f:
        assert [(r["method"], r["n"], r["seeds"]) for r in csv.DictReader(f)] == [("KD", "2", "0 1")]
    paper_job(tmp_path / "c" / "kd1", KD, PAIR, 1, 71.4)  # a rerun of a's seed 1 into another folder
    before = tree_state(tmp_path)
    assert report.main([str(tmp_path / "a"), str(tmp_path / "c"), "--paper", "crd"]) == 1
    error = capsys.readouterr().err
    assert f"Runs of one config and seed are in two of the folders given: {tmp_path / 'a' / 'kd1'} and " \
           f"{tmp_path / 'c' / 'kd1'} (seed 1). Each run is counted once: report those folders apart" in error
    assert tree_state(tmp_path) == before  # nothing written


def test_cells_further_than_two_std_from_the_paper_are_flagged_and_n_1_is_not_tested(tmp_path):
    for seed, last in enumerate((73.9, 74.0, 74.1)):  # 3.3 points above 70.66, std 0.1: flagged
        paper_job(tmp_path / f"kd{seed}", KD, PAIR, seed, last)
    for seed, last in enumerate((72.0, 73.0, 74.0)):  # 0.92 below 73.08 with std 1.0: within
        paper_job(tmp_path / f"kd_other{seed}", KD, OTHER, seed, last, **{"teacher/acc1": 74.0})
    paper_job(tmp_path / "ce0", CE, PAIR, 0, 60.0)  # one run, 9 points off: no spread to test
    fsp = {"_target_": "kd.methods.base.Combined", "ce": CE, "fsp": {"_target_": "kd.methods.fsp.FSPLoss"}}
    paper_job(tmp_path / "fsp0", fsp, PAIR, 0, 70.0)
    assert report.main([str(tmp_path), "--paper", "crd"]) == 0
    markdown = (tmp_path / "report.md").read_text()
    rows = table_lines(markdown, "Beside Tian et al., ICLR 2020 (CRD)")
    assert rows == [
        ["method \\ pair", "resnet56 -> resnet20", "resnet110 -> resnet32"],  # the paper's column order
        ["teacher", "72.00 (n=1) / 72.34 (-0.34)", "74.00 (n=1) / 74.31 (-0.31)"],
        ["CE (no teacher)", "60.00 (n=1) / 69.06 (-9.06)", "– / 71.14"],  # the paper's row order
        ["KD", "74.00 ± 0.10 (n=3) / 70.66 (+3.34) †", "73.00 ± 1.00 (n=3) / 73.08 (-0.08)"],
        ["FSP", "70.00 (n=1) / 69.95 (+0.05)", "– / 71.89"]]
    assert "†: ours is further from the paper than 2 of our standard deviations" in markdown
    with (tmp_path / "paper_crd.csv").open() as f:
        flagged = {(r["method"], r["pair"]): r["flagged"] for r in csv.DictReader(f)}
    assert flagged[("KD", "resnet56 -> resnet20")] == "True" and flagged[("KD", "resnet110 -> resnet32")] == "False"


def test_two_settings_in_one_paper_cell_are_refused_naming_them(tmp_path, capsys):
    for temperature in (4, 8):
        paper_job(tmp_path / f"kd_t{temperature}", {**KD, "temperature": temperature}, PAIR, 0, 70.0)
    before = tree_state(tmp_path)
    assert report.main([str(tmp_path), "--paper", "crd"]) == 1
    assert ("--paper: rows #1 and #2 are both KD on resnet56 -> resnet20 (they differ in loss.temperature), and the "
            "paper's table has one cell for it.") in capsys.readouterr().err
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------------------------
# acceptance: a finished crd_table1 folder


def write_published_teachers(folder: Path, num_classes: int) -> dict[str, str]:
    """A random network of each Table 1 teacher, saved as RepDistiller saves its teachers; their sha256 by model."""
    shas = {}
    for number, name in enumerate(("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13")):
        torch.manual_seed(number)
        node = OmegaConf.merge(OmegaConf.load(CONF / "model" / f"{name}.yaml"), {"num_classes": num_classes})
        path = folder / teachers.PUBLISHED_LAYOUT.format(model=name)
        path.parent.mkdir(parents=True)
        torch.save({"epoch": 240, "model": instantiate(node).state_dict(), "accuracy": torch.tensor(10.0 + number),
                    "optimizer": None}, path)
        shas[name] = fileio.sha256_file(path)
    return shas


def copy_job(sweep_dir: Path, job: list[str], config: dict, result: dict) -> None:
    """A finished job folder as train.py leaves one (run.json, result.json), named as Hydra names it (the swept
    overrides)."""
    swept = [o for o in job if o.split("=", 1)[0] in ("experiment", "loss", "seed")]
    folder = sweep_dir / records.bounded_name(",".join(swept))
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"overrides": job, "config": config, "seed_linked": []}))
    (folder / "result.json").write_text(json.dumps({**result, "config": config}))


def test_a_finished_crd_table1_folder_renders_the_papers_table_with_each_run_once(tmp_path):
    """Acceptance (issue 18): `kd.report --paper crd` on a finished crd_table1 folder at test scale renders one table
    with every row of the paper's Table 1 and its 7 pairs, each of the 520 runs counted once.

    Training all 520 jobs would take hours on this CPU, so the folder is built as follows, and the report reads it by
    its real code path: the grid and sweep.json are the preset's (kd.sweep.sweep_record); two jobs (resnet56 ->
    resnet20, CE and KD, seed 0) are real runs of their composed configs against the published-layout teachers the
    test writes into teachers_dir; every other job is a copy of a real run's result.json under its own config, built
    by kd.sweep_cost.job_trees (whose configs equal Hydra's: checked here for the real jobs), with made-up
    accuracies. The runs are digits at 8x8 for one epoch, so the table is labelled a short run."""
    sweep_dir, teachers_dir = tmp_path / "tables" / "crd_table1", tmp_path / "cifar_teachers"
    shas = write_published_teachers(teachers_dir, num_classes=10)
    overrides = ["sweep=crd_table1", *SCALE, f"teachers_dir={teachers_dir}", f"hydra.sweep.dir={sweep_dir}"]
    with initialize(version_base="1.3", config_path="../conf"):
        config = composed(*overrides)
        record = sweep.sweep_record(config)
        trees = sweep_cost.job_trees(config, record["grid"])
        real = {}
        for loss in ("ce", "kd"):
            job = [*overrides[:-1], "experiment=crd_resnet56_resnet20", f"loss={loss}", "seed=0"]
            real[loss] = engine.run(compose("config", overrides=job), tmp_path / "real" / loss, overrides=job)
    sweep_dir.mkdir(parents=True)
    fileio.write_json(sweep_dir / "sweep.json", record)
    assert len(record["grid"]) == 7 * 15 * 5 - 5
    written = {}
    for number, (job, tree) in enumerate(zip(record["grid"], trees)):
        config_ = records.plain_config(sweep_cost.resolved(tree))
        values = dict(o.split("=", 1) for o in job)
        pair, loss, seed = values["experiment"], values["loss"], int(values["seed"])
        source = real.get(loss) if pair == "crd_resnet56_resnet20" else None
        if source is not None and seed == 0:
            assert config_ == source["config"]  # job_trees' config is the one Hydra composed for the real run
        teacher = config_["teacher"]["_target_"].rsplit(".", 1)[-1]
        base = source or real["kd"]
        last = base["test/acc1"] if source is not None and seed == 0 else 40.0 + number % 50 + seed / 10
        result = {**base, "test/acc1": last, "test/acc1_best": last + 0.5, "teacher/sha256": shas[teacher],
                  "teacher/acc1": real["kd"]["teacher/acc1"] if teacher == "resnet56" else 30.0 + len(teacher)}
        copy_job(sweep_dir, job, config_, result)
        written.setdefault((pair, loss), []).append(last)

    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--paper", "crd", "--metric", "last", "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    rows = table_lines(markdown, "Beside Tian et al., ICLR 2020 (CRD)")
    assert rows[0] == ["method \\ pair", *TABLE1_PAIRS]
    assert [row[0] for row in rows[1:]] == TABLE1_ROWS  # the 13 methods of RepDistiller's table, CRD+KD, in order
    fsp = rows[1 + TABLE1_ROWS.index("FSP")]
    assert fsp[2] == "N/A"  # wrn_40_2 -> wrn_40_1: not in the grid, N/A in the paper
    for row in rows[2:]:
        assert all("(n=5) / " in cell for cell in row[1:] if cell != "N/A"), row
    assert all(cell.startswith(f"{30.0 + len(t):.2f} (n=1) / ") for cell, t in zip(rows[1][1:], (
        "wrn_40_2", "wrn_40_2", None, "resnet110", "resnet110", "resnet32x4", "vgg13")) if t)  # one teacher each
    kd = written[("crd_resnet56_resnet20", "kd")]
    assert rows[3][3].startswith(f"{statistics.mean(kd):.2f} ± {statistics.stdev(kd):.2f} (n=5) / 70.66 (")
    assert "**A short run, not the paper's setting** (dataset digits, not cifar100; epochs 1, not 240)" in markdown
    assert "None: every expected job has a result.json." in markdown
    with (out / "report.csv").open() as f:
        counts = [(r["n"], r["n_expected"]) for r in csv.DictReader(f)]
    assert len(counts) == 104 and set(counts) == {("5", "5")}
    assert sum(1 for _ in (out / "runs.csv").open()) == 1 + 520
