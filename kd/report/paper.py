"""The comparison with a paper's published figures (kd.published): one renderer, a method × pair table of ours beside
theirs, and paper_<name>.csv."""
import math
from typing import Any, Optional, Sequence

from kd import published
from kd.report.aggregate import Panel, Row, mean_std, pivot_panels
from kd.report.keys import METHOD, PAIR, fmt_value
from kd.report.render import Table, csv_value, fmt_stat, markdown_table


def paper_section(rows: Sequence[Row], name: str) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """"Ours beside the paper": a method × pair table whose cells hold our mean ± std at the paper's convention
    (its last or best epoch), the published figure and our difference; the teachers' row compares their accuracy.
    Returns the Markdown and paper_<name>.csv's records by file name. Figures and their sources: kd.published."""
    paper = published.load(name)
    student_rows = [row for row in rows if PAIR in row.group.key]
    if not student_rows:
        return [f"## Beside {paper.short}\n", "No student runs: nothing to compare.", ""], {}
    lines = [f"## Beside {paper.short}: ours / paper (ours − paper), test top-1 %\n"]
    records, conventions = [], set()
    for panel in pivot_panels(student_rows, METHOD, PAIR):
        header = [f"{METHOD} \\ {PAIR}", *[fmt_value(c) for c in panel.col_values]]
        cells = [["teacher", *[paper_cell(panel_teacher(panel, pair), paper, "teacher", pair, records, conventions)
                               for pair in panel.col_values]]]
        for method in panel.row_values:
            cells.append([fmt_value(method)] + [
                paper_cell(panel.cells.get((fmt_value(method), fmt_value(pair))), paper, method, pair, records,
                           conventions) for pair in panel.col_values])
        lines += [f"{panel.title}:\n" if panel.title else "", markdown_table(Table(header, cells))]
    sides = "; ".join(f"`{c}` = {'the final epoch (test/acc1)' if c == 'last' else 'the best epoch (test/acc1_best)'}"
                      for c in sorted(conventions))
    sources = sorted({record["paper_source"] for record in records if record["paper_source"]})
    return lines + [
        f"{paper.citation}. The paper reports the **{paper.convention}** epoch ({paper.convention_evidence}) Each of "
        f"our cells is taken at the convention of the figure beside it ({sides}; marked when it is not the paper's). "
        f"{paper.statistic}", "", "Sources: " + "; ".join(sources) + ".", ""], {f"paper_{name}.csv": records}


def panel_teacher(panel: "Panel", pair: Any) -> Optional[tuple[float, float]]:
    """The mean and spread of the teachers' measured accuracy over a pair's rows in a panel (None without one)."""
    values = [run.result["teacher/acc1"] for (_, c), row in panel.cells.items() if c == fmt_value(pair)
              for run in row.group.runs if isinstance(run.result.get("teacher/acc1"), (int, float))]
    return mean_std(values) if values else None


def paper_cell(ours: Any, paper: "published.Paper", method: Any, pair: Any, records: list, conventions: set) -> str:
    """One cell: ours at the figure's convention, the figure, and the difference; ours alone without a figure."""
    figure = published.figure(paper, str(method), str(pair))
    convention = figure.convention if figure else paper.convention
    stat = ours.stats[convention] if isinstance(ours, Row) else ours  # a Row, or the teacher's (mean, std)
    if stat is None and figure is None:
        return ""
    text = "–" if stat is None else fmt_stat(stat)
    mark = "" if convention == paper.convention else f" ({convention} epoch)"
    if figure is not None:
        delta = "" if stat is None or math.isnan(stat[0]) else f" ({stat[0] - figure.top1:+.2f})"
        text = f"{text}{mark} / {figure.top1:.2f}{delta}"
        conventions.add(convention)
    records.append({"method": method, "pair": pair, "ours_mean": csv_value(stat[0]) if stat else "",
                    "ours_std": csv_value(stat[1]) if stat else "", "ours_epoch": convention,
                    "n": ours.n if isinstance(ours, Row) else "", "paper": figure.top1 if figure else "",
                    "paper_source": f"{figure.table}: {figure.source}" if figure else "",
                    "delta": csv_value(stat[0] - figure.top1) if figure and stat else ""})
    return text
