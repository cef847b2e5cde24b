"""Paper-ready kd.report (issue 19 item 2) on hand-made sweeps: the best configuration in bold, columns and order
chosen by option, the table on the terminal, runs.csv and load(), any recorded metric, readable LaTeX, the baseline
of the same temperature, and latency timed in a quiet step instead of inside the jobs."""
import csv
import re
from pathlib import Path

import pytest

from kd import report
from kd.report import latency
from support import tree_state
from support.jobs import fake_config, fake_job, section

KD_LOSS = {"_target_": "kd.methods.kd.KDLoss", "alpha": 0.9, "temperature": 4}
TEACHER = {"_target_": "kd.models.cifar_resnet.resnet56"}
# (alpha, temperature) -> test/acc1 of seeds 0 and 1, and val/acc1 and val/loss of both: the KD student at T=4 is
# the best on the test split, the one at T=2 on the validation split, and each baseline differs from the other.
GRID = {(0.0, 2): ((60.0, 61.0), 75.0, 0.5), (0.0, 4): ((62.0, 63.0), 75.0, 0.9),
        (0.9, 2): ((64.0, 65.0), 80.0, 0.8), (0.9, 4): ((70.0, 71.0), 76.0, 0.7)}


@pytest.fixture
def grid(tmp_path) -> Path:
    """A student sweep of alpha 0 / 0.9 x temperature 2 / 4 x seeds 0 / 1 (one teacher -> student pair)."""
    sweep = tmp_path / "sweep"
    for number, ((alpha, temperature), (tests, val, loss)) in enumerate(GRID.items()):
        for seed, acc in enumerate(tests):
            config = fake_config({**KD_LOSS, "alpha": alpha, "temperature": temperature}, 1.0, seed, teacher=TEACHER)
            fake_job(sweep / f"{number}_{seed}", [f"loss.alpha={alpha}", f"loss.temperature={temperature}",
                                                   f"seed={seed}"], config, {"latency_ms": 483.95 if seed else 1.49},
                     **{"test/acc1": acc, "test/acc1_best": acc + 0.5, "val/acc1": val, "val/loss": loss,
                        "params": 1000, "flops_per_image": 2e6})
    return sweep


def run_report(sweep: Path, *args: str) -> str:
    """report.md after `python -m kd.report SWEEP ARGS` (in-process)."""
    assert report.main([str(sweep), *args]) == 0
    return (sweep / "report.md").read_text()


def main_table(markdown: str) -> list[list[str]]:
    """The main table's header and rows as lists of cells."""
    lines = ("| # |" + markdown.split("| # |", 1)[1].split("\n\n", 1)[0]).splitlines()
    return [cells(line) for line in lines[:1] + lines[2:]]


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def by_setting(sweep: Path, name: str = "report.csv") -> dict[tuple[float, float], dict[str, str]]:
    with (sweep / name).open() as f:
        return {(float(r["loss.alpha"]), float(r["loss.temperature"])): r for r in csv.DictReader(f)}


def refused(sweep: Path, capsys, *args: str) -> str:
    """The error line of a refused report, after checking it wrote nothing."""
    before = tree_state(sweep)
    assert report.main([str(sweep), *args]) == 1
    assert tree_state(sweep) == before
    return capsys.readouterr().err


# ---------------------------------------------------------------- the baseline label


def test_each_kd_row_is_compared_with_the_baseline_of_its_temperature(grid):
    """Δ is against the alpha=0 row of the same temperature, and `vs #k` names that row (it named the first
    baseline, of another temperature, before)."""
    markdown, rows = run_report(grid, "--metric", "last"), by_setting(grid)
    for temperature in (2, 4):
        kd, base = rows[(0.9, temperature)], rows[(0.0, temperature)]
        assert kd["baseline_row"] == base["row"]
        expected = sum(GRID[(0.9, temperature)][0]) / 2 - sum(GRID[(0.0, temperature)][0]) / 2
        assert float(kd["delta_last"]) == pytest.approx(expected)
        line = next(line for line in main_table(markdown) if line[0] == kd["row"])
        assert line[-1] == f"{expected:+.2f} (vs #{base['row']})"


# ---------------------------------------------------------------- the best configuration


def test_the_best_configuration_is_bold_in_markdown_latex_and_pivots(grid):
    markdown = run_report(grid, "--latex", "--pivot", "loss.alpha", "loss.temperature")
    best = by_setting(grid)[(0.9, 4)]["row"]
    table = main_table(markdown)
    last, best_epoch = table[0].index("test top-1 last (%)"), table[0].index("test top-1 best (%)")
    for line in table[1:]:
        bold = line[0] == best
        assert (line[last] == "**70.50 ± 0.71**") if bold else not line[last].startswith("**")
        assert (line[best_epoch] == "**71.00 ± 0.71**") if bold else not line[best_epoch].startswith("**")
    pivot = section(markdown, "Pivot: loss.alpha × loss.temperature")
    assert "| 0.9 | 64.50 ± 0.71 | **70.50 ± 0.71** |" in pivot and pivot.count("**") == 2
    tex = (grid / "report.tex").read_text()
    main_tex, pivot_tex = tex.split(r"\end{tabular}")[:2]
    assert re.findall(r"\\textbf\{([^}]*)\}", main_tex) == [r"70.50 $\pm$ 0.71", r"71.00 $\pm$ 0.71"]
    assert re.findall(r"\\textbf\{([^}]*)\}", pivot_tex) == [r"70.50 $\pm$ 0.71"]
    assert "**Bold**: the best configuration for each teacher -> student pair" in markdown


def test_equal_means_at_two_decimals_are_all_bold_and_each_pair_has_its_best(tmp_path):
    """70.001 and 69.999 both read 70.00: both are marked; a second pair's rows compete among themselves."""
    for number, (student, alpha, acc) in enumerate((("resnet20", 0.9, 70.001), ("resnet20", 0.5, 69.999),
                                                    ("resnet20", 0.0, 65.0), ("resnet8", 0.9, 50.0),
                                                    ("resnet8", 0.0, 40.0))):
        config = fake_config({**KD_LOSS, "alpha": alpha}, 1.0, 0, teacher=TEACHER)
        config["student"]["_target_"] = f"kd.models.cifar_resnet.{student}"
        fake_job(tmp_path / f"job{number}", [f"model@student={student}", f"loss.alpha={alpha}"], config,
                 **{"test/acc1": acc, "test/acc1_best": acc})
    table = main_table(run_report(tmp_path, "--metric", "last", "--columns", "pair,loss.alpha"))
    bold = sorted((line[1], line[2]) for line in table[1:] if line[3].startswith("**"))
    assert bold == [("resnet56 -> resnet20", "0.5"), ("resnet56 -> resnet20", "0.9"), ("resnet56 -> resnet8", "0.9")]


# ---------------------------------------------------------------- any recorded metric


def test_any_recorded_metric_is_the_tables_metric(grid):
    markdown = run_report(grid, "--metric", "val/acc1", "--pivot", "loss.alpha", "loss.temperature")
    table = main_table(markdown)
    column = table[0].index("val/acc1")
    assert "test top-1 last (%)" not in table[0] and "Δ val/acc1" in table[0]
    cells = {line[0]: line[column] for line in table[1:]}
    rows = by_setting(grid)
    assert cells[rows[(0.9, 2)]["row"]] == "**80.00 ± 0.00**" and cells[rows[(0.9, 4)]["row"]] == "76.00 ± 0.00"
    assert "Cells: val/acc1 (result.json" in markdown
    assert "## Pivot: loss.alpha × loss.temperature (val/acc1)" in markdown
    assert float(rows[(0.9, 2)]["val_acc1_mean"]) == 80.0 and float(rows[(0.9, 2)]["delta_val_acc1"]) == 5.0
    # A loss is best when lowest.
    table = main_table(run_report(grid, "--metric", "val/loss"))
    (best,) = [line for line in table[1:] if line[table[0].index("val/loss")].startswith("**")]
    assert best[0] == by_setting(grid)[(0.0, 2)]["row"]


def test_a_metric_no_run_recorded_is_refused_naming_the_recorded_ones(grid, capsys):
    err = refused(grid, capsys, "--metric", "val/acc")
    assert err.startswith("kd.report: --metric val/acc: no finished run recorded it in result.json; recorded: ")
    assert "test/acc1, test/acc1_best, val/acc1, val/loss" in err and "(or last, best, both: test top-1)" in err


# ---------------------------------------------------------------- columns and order


def test_columns_are_chosen_and_rows_sorted_by_option(grid):
    markdown = run_report(grid, "--metric", "last", "--columns", "loss.temperature,method,metric,delta",
                          "--sort=-metric")
    table = main_table(markdown)
    assert table[0] == ["#", "loss.temperature", "method", "test top-1 last (%)", "Δ last"]
    means = [float(line[3].strip("*").split(" ± ")[0]) for line in table[1:]]
    assert means == [70.5, 64.5, 62.5, 60.5] and [line[0] for line in table[1:]] == ["1", "2", "3", "4"]
    assert table[1][1:3] == ["4", "KD"] and table[1][4] == "+8.00 (vs #3)"  # renumbered: the T=4 baseline is #3
    run_report(grid, "--sort", "loss.temperature,-loss.alpha")
    order = sorted(by_setting(grid).items(), key=lambda item: int(item[1]["row"]))
    assert [setting for setting, _ in order] == [(0.9, 2), (0.0, 2), (0.9, 4), (0.0, 4)]


@pytest.mark.parametrize("args, message", [
    (("--columns", "method,loss.temprature"), "--columns loss.temprature: no such column or config key; columns: "
                                              "metric, n, params, flops, teacher, latency, delta; keys: "),
    (("--columns", "latency"), "--columns latency: no latency is measured without --latency"),
    (("--sort", "loss.alfa"), "--sort loss.alfa: no such config key or metric; known: "),
    (("--latency", "--latency-device", "abacus"), "--latency-device abacus: not a device ("),
], ids=["unknown-column", "latency-unmeasured", "unknown-sort-key", "unknown-device"])
def test_unknown_columns_and_sort_keys_are_refused_before_any_file(grid, capsys, args, message):
    assert refused(grid, capsys, *args).startswith(f"kd.report: {message}")


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit:
        report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit.value.code == 0
    for option in ("--columns NAME,... the main table's columns, in order", "--sort NAME,... order the rows",
                   "-NAME descends (write --sort=-metric)", "--metric METRIC what the tables show",
                   "--latency time each distinct model once here", "--latency-device DEVICE"):
        assert option in text


# ---------------------------------------------------------------- terminal, runs.csv, load()


def test_the_main_table_is_printed_to_the_terminal(grid, capsys):
    markdown = run_report(grid)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == str(grid / "report.md")
    printed = [line for line in out if line.startswith("|")]
    assert len({len(line) for line in printed}) == 1  # padded: the columns line up
    assert [cells(line) for line in printed[:1] + printed[2:]] == main_table(markdown)


def test_runs_csv_has_one_line_per_run_and_load_returns_it(grid):
    run_report(grid)
    with (grid / "runs.csv").open() as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 8
    for run in runs:
        tests = GRID[(float(run["loss.alpha"]), int(run["loss.temperature"]))][0]
        assert float(run["test/acc1"]) == tests[int(run["seed"])]
        assert run["row"] == by_setting(grid)[(float(run["loss.alpha"]), float(run["loss.temperature"]))]["row"]
    assert {float(run["run_info/latency_ms"]) for run in runs} == {1.49, 483.95}  # as the jobs recorded it
    frame = report.load(grid)
    assert list(frame.columns) == list(runs[0]) and len(frame) == 8
    ordered = frame.sort_values(["row", "seed"])
    assert ordered["test/acc1"].tolist() == [float(r["test/acc1"]) for r in sorted(
        runs, key=lambda r: (int(r["row"]), int(r["seed"])))]
    assert frame["test/acc1"].dtype.kind == "f" and frame["seed"].dtype.kind == "i"
    with pytest.raises(FileNotFoundError, match="no such folder: .*nowhere"):
        report.load(grid / "nowhere")


# ---------------------------------------------------------------- LaTeX


def test_latex_has_readable_headers_and_right_aligned_numbers(grid):
    run_report(grid, "--latex", "--pivot", "loss.alpha", "loss.temperature")
    main_tex, pivot_tex = (grid / "report.tex").read_text().split(r"\end{tabular}")[:2]
    lines = main_tex.strip().splitlines()
    # #, method and T; then last, best, n, params, FLOPs, teacher, Δ last, Δ best: numbers right-aligned.
    assert lines[:2] == [r"\begin{tabular}{rllrrrrrrrr}", r"\toprule"]
    assert lines[2] == (r"\# & Method & $T$ & Top-1 last (\%) & Top-1 best (\%) & $n$ & Params & FLOPs (M) & "
                        r"Teacher top-1 (\%) & $\Delta$ last & $\Delta$ best \\")
    assert lines[3] == r"\midrule" and "loss.temperature" not in main_tex and "±" not in main_tex
    assert r"CE (no teacher) & 2 & 60.50 $\pm$ 0.71" in main_tex and r"(vs \#" in main_tex
    assert r"\begin{tabular}{lrr}" in pivot_tex and r"$\alpha$ $\backslash$ $T$ & 2 & 4 \\" in pivot_tex


# ---------------------------------------------------------------- latency


@pytest.fixture
def quick_timing(monkeypatch) -> list:
    """Real torch.utils.benchmark timings, short (the test checks how they are taken, not the figures); the models
    timed are listed."""
    monkeypatch.setattr(latency, "MIN_RUN_TIME_S", 0.02)
    timed, time_model = [], latency.time_model
    monkeypatch.setattr(latency, "time_model", lambda node, *args: timed.append(node) or time_model(node, *args))
    return timed


def test_latency_is_timed_once_per_model_in_the_report_not_taken_from_the_jobs(tmp_path, quick_timing, monkeypatch,
                                                                             capsys):
    """Two widths x CE/KD: two models timed, each once; the jobs' own latency_ms (1.49 / 483.95) is never shown."""
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    for number, (alpha, width) in enumerate((a, w) for a in (0.0, 0.9) for w in (0.25, 0.5)):
        config = fake_config({**KD_LOSS, "alpha": alpha}, width, 0, teacher=TEACHER)
        fake_job(tmp_path / f"job{number}", [f"loss.alpha={alpha}", f"student.width={width}"], config,
                 {"latency_ms": 483.95}, **{"test/acc1": 60.0 + number, "test/acc1_best": 61.0})
    markdown = run_report(tmp_path, "--latency", "--metric", "last")
    assert sorted(node["width"] for node in quick_timing) == [0.25, 0.5]
    table = main_table(markdown)
    assert table[0][-1] == "latency (ms)"
    with (tmp_path / "report.csv").open() as f:
        measured = {(r["student.width"], float(r["latency_ms"])) for r in csv.DictReader(f)}
    assert len(measured) == 2 and all(0 < ms < 400 for _, ms in measured)  # one figure per width
    assert {line[-1] for line in table[1:]} == {f"{ms:.2f}" for _, ms in measured}
    assert "torch.utils.benchmark's blocked_autorange" in markdown and "2 distinct models, each once" in markdown
    assert "483.95" not in markdown and "Busy machine" not in capsys.readouterr().err


def test_latency_on_a_busy_machine_is_flagged(grid, quick_timing, monkeypatch, capsys):
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    markdown = run_report(grid, "--latency")
    assert len(quick_timing) == 1  # one student model for the whole sweep
    assert "**Busy machine**: the load average was 7.50" in markdown and "Busy machine" in capsys.readouterr().err


def test_latency_of_a_model_that_cannot_be_built_is_refused_before_any_file(tmp_path, capsys):
    config = fake_config(KD_LOSS, 1.0, 0, teacher=TEACHER)
    config["student"]["_target_"] = "kd.models.gone.gone_net"
    fake_job(tmp_path / "job", ["loss.alpha=0.9"], config, **{"test/acc1": 60.0, "test/acc1_best": 61.0})
    err = refused(tmp_path, capsys, "--latency")
    assert err.startswith("kd.report: --latency: cannot build the model kd.models.gone.gone_net recorded in "
                          "result.json (")
    assert err.rstrip().endswith("Report without --latency, or with this repository's version that trained it.")


def test_a_bad_option_is_refused_before_any_model_is_timed(grid, quick_timing, capsys):
    assert refused(grid, capsys, "--latency", "--pivot", "loss.alfa", "method").startswith("kd.report: --pivot")
    assert quick_timing == []
