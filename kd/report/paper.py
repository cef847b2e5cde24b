"""The comparison with a paper's published figures (kd.published) in the paper's layout: one table, its methods as
rows and its teacher -> student pairs as columns in the paper's order, each cell ours beside theirs; and
paper_<name>.csv."""
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from kd import published
from kd.report.aggregate import Row, mean_std
from kd.report.keys import METHOD, PAIR
from kd.report.render import Table, csv_value, fmt_stat, markdown_table

TEACHER = "teacher"
FLAG = "†"
FLAG_SIGMAS = 2.0  # a cell further from the paper than this many of our standard deviations is flagged


@dataclass
class Comparison:
    """What the cells of one paper table share: the paper, how our runs differ from its setting (a short run), and
    what the cells add as they are rendered (CSV records, the conventions used)."""

    paper: "published.Paper"
    short: list[str]
    records: list[dict[str, Any]] = field(default_factory=list)
    conventions: set[str] = field(default_factory=set)


def paper_section(rows: Sequence[Row], name: str) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """"Ours beside the paper": one method × pair table whose cells hold our mean ± std (n) at the paper's convention
    (its last or best epoch), the published figure and our difference, flagged beyond FLAG_SIGMAS of our std; the
    teachers' row compares their accuracy, each distinct teacher counted once. Returns the Markdown and
    paper_<name>.csv's records by file name. A ValueError names two rows that would share a cell."""
    paper = published.load(name)
    cells = paper_cells([row for row in rows if PAIR in row.group.key])
    if not cells:
        return [f"## Beside {paper.short}\n", "No student runs: nothing to compare.", ""], {}
    methods = in_order(published.methods(paper), {published.REPORT_NAMES.get(m, m) for m, _ in cells})
    pairs = in_order(published.pairs(paper), {pair for _, pair in cells})
    table = Comparison(paper, short_run(paper, cells))
    lines = [[TEACHER, *[paper_cell(teacher_stat(cells, pair), TEACHER, pair, table) for pair in pairs]]]
    for method in (m for m in methods if m != TEACHER):
        shown = report_name(method)
        lines.append([shown, *[paper_cell(cells.get((shown, pair)), shown, pair, table) for pair in pairs]])
    markdown = markdown_table(Table([f"{METHOD} \\ {PAIR}", *pairs], lines))
    return [f"## Beside {paper.short}: ours / paper (ours − paper), test top-1 %\n", *short_lines(table.short),
            markdown, *legend(table)], {f"paper_{name}.csv": table.records}


def paper_cells(rows: Sequence[Row]) -> dict[tuple[str, str], Row]:
    """The student rows by (method, pair); two rows in one cell (runs of other settings) are refused, naming them."""
    cells: dict[tuple[str, str], Row] = {}
    for row in rows:
        cell = (str(row.group.key[METHOD]), str(row.group.key[PAIR]))
        if cell in cells:
            other = cells[cell].group.key
            differ = sorted(k for k in set(other) | set(row.group.key) if other.get(k) != row.group.key.get(k))
            raise ValueError(
                f"--paper: rows #{cells[cell].index} and #{row.index} are both {cell[0]} on {cell[1]} (they differ in "
                f"{', '.join(differ)}), and the paper's table has one cell for it. Report the runs of one setting "
                "(their folders, without the others), or leave out --paper.")
        cells[cell] = row
    return cells


def in_order(paper_order: Sequence[str], ours: set[str]) -> list[str]:
    """The paper's rows or columns that we have, in its order, then ours that it lacks (sorted)."""
    return [x for x in paper_order if x in ours] + sorted(ours - set(paper_order))


def report_name(method: str) -> str:
    """A paper row's name as kd.report names the method ("student" is CE (no teacher))."""
    return {name: report for report, name in published.REPORT_NAMES.items()}.get(method, method)


def teacher_stat(cells: dict[tuple[str, str], Row], pair: str) -> Optional[tuple[float, float, int]]:
    """Mean, std and count of the teachers' measured accuracy for a pair, each distinct teacher (its weights' sha256)
    counted once however many runs measured it; a run without the sha256 counts as a teacher of its own."""
    teachers: dict[str, float] = {}
    for (_, cell_pair), row in cells.items():
        for run in row.group.runs if cell_pair == pair else []:
            accuracy = run.result.get("teacher/acc1")
            if isinstance(accuracy, (int, float)):
                teachers.setdefault(str(run.result.get("teacher/sha256") or run.path), float(accuracy))
    return (*mean_std(list(teachers.values())), len(teachers)) if teachers else None


def short_run(paper: "published.Paper", cells: dict[tuple[str, str], Row]) -> list[str]:
    """How our runs differ from the setting of the figures beside them ("digits, not cifar100"), empty when they do
    not: a short run shows the path from sweep to table, not the paper's numbers."""
    found = []
    for (method, pair), row in cells.items():
        figure = published.figure(paper, method, pair)
        if figure is None:
            continue
        key = row.group.key
        for name, ours, theirs in (("dataset", key.get("dataset.name"), figure.dataset),
                                   ("epochs", key.get("epochs"), figure.epochs)):
            if theirs is not None and ours is not None and ours != theirs:
                found.append(f"{name} {ours}, not {theirs}")
    return list(dict.fromkeys(found))


def short_lines(short: Sequence[str]) -> list[str]:
    """The short-run label above the table (nothing for runs of the paper's setting)."""
    if not short:
        return []
    return [f"**A short run, not the paper's setting** ({'; '.join(short)}): these cells show the path from sweep to "
            "table; their differences from the paper say nothing about the methods, and none is flagged.", ""]


def paper_cell(ours: Any, method: str, pair: str, table: Comparison) -> str:
    """One cell: ours (mean ± std (n)) at the figure's convention, the figure, our difference, FLAG when it exceeds
    FLAG_SIGMAS of our std (n >= 2, not in a short run); N/A where the source leaves the cell empty."""
    paper = table.paper
    figure = published.figure(paper, method, pair)
    convention = figure.convention if figure else paper.convention
    stat, n, expected = ours_stat(ours, convention)
    missing = published.not_applicable(paper, method, pair)
    if stat is None and figure is None:
        return "N/A" if missing is not None else ""
    text = "–" if stat is None else f"{fmt_stat(stat[:2])} ({fmt_count(n, expected)})"
    text += "" if convention == paper.convention else f" ({convention} epoch)"
    delta = None if stat is None or figure is None or math.isnan(stat[0]) else stat[0] - figure.top1
    flagged = delta is not None and not table.short and n >= 2 and abs(delta) > FLAG_SIGMAS * stat[1]
    if figure is not None:
        text += f" / {figure.top1:.2f}" + ("" if delta is None else f" ({delta:+.2f})") + (" " + FLAG) * flagged
        table.conventions.add(convention)
    elif missing is not None:
        text += " / N/A"
    table.records.append({"method": method, "pair": pair, "ours_mean": csv_value(stat[0]) if stat else "",
                          "ours_std": csv_value(stat[1]) if stat else "", "n": n, "n_expected": expected,
                          "ours_epoch": convention, "paper": figure.top1 if figure else "",
                          "paper_source": f"{figure.table}: {figure.source}" if figure else "",
                          "delta": csv_value(delta), "flagged": flagged})
    return text


def ours_stat(ours: Any, convention: str) -> tuple[Optional[tuple[float, float]], int, int]:
    """(mean, std), n and the n the sweeps asked for, of a Row at a convention or of the teachers' (mean, std, n)."""
    if isinstance(ours, Row):
        return ours.stats[convention], ours.counts.get(convention, ours.n), ours.group.expected
    if ours is None:
        return None, 0, 0
    return ours[:2], ours[2], ours[2]


def fmt_count(n: int, expected: int) -> str:
    """n, or `n of N` when the sweeps asked for more runs than finished."""
    return f"n={n}" if n >= expected else f"n={n} of {expected}"


def legend(table: Comparison) -> list[str]:
    """How to read the table: conventions, n, the flag, N/A, the paper's statistic and the sources shown."""
    paper = table.paper
    sides = "; ".join(f"`{c}` = {'the final epoch (test/acc1)' if c == 'last' else 'the best epoch (test/acc1_best)'}"
                      for c in sorted(table.conventions))
    flag = ("none is flagged in a short run" if table.short else
            f"{FLAG}: ours is further from the paper than {FLAG_SIGMAS:g} of our standard deviations (tested where "
            "n >= 2; with n = 1 there is no spread, and the cell is not tested)")
    sources = sorted({record["paper_source"] for record in table.records if record["paper_source"]})
    return ["", f"{paper.citation}. The paper reports the **{paper.convention}** epoch ({paper.convention_evidence}) "
            f"Each of our cells is taken at the convention of the figure beside it ({sides}; marked when it is not "
            f"the paper's): mean ± sample std over our seeds (n runs; `n of N` when the sweep asked for N); the "
            f"teacher row counts each distinct teacher (its weights' sha256) once. {flag}. N/A: a cell the paper "
            f"leaves empty. {paper.statistic}", "", "Sources: " + "; ".join(sources) + ".", ""]
