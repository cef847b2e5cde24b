"""Published CIFAR-100 results to set beside this repository's tables: `load("crd")`, `load("dkd")`.

The figures live in kd/published/cifar100.yaml, each with its paper, table, source (repository@commit path line)
and convention ("last" epoch or "best" epoch, the keys of kd.report.METRICS). Cells are keyed by (method, pair)
as kd.report names them: method "KD", "DKD", "KD+CRD", ... plus "teacher" and "student" (the student trained
alone); pair "<teacher> -> <student>" with the model factory names. Where sources disagree a cell holds several
figures, the first from the paper's own repository.

    crd = load("crd")
    fig = figure(crd, "KD", "resnet56 -> resnet20")  # Figure(top1=70.66, convention="last", source=..., ...)
    cite(fig)  # "70.66 (Tian et al., ICLR 2020 (CRD), Table 1 (same architecture), last epoch)"
"""
import functools
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Optional

import yaml

DATA_FILE = "cifar100.yaml"
TEACHER, STUDENT = "teacher", "student"
# kd.report's method names for the rows the papers call Teacher and Student.
REPORT_NAMES = {"teacher (CE)": TEACHER, "CE (no teacher)": STUDENT}
CONVENTIONS = ("last", "best")


@dataclass(frozen=True)
class Figure:
    """One published top-1 accuracy (%) and where it was read."""

    top1: float
    method: str
    pair: str
    paper: str
    table: str
    source: str  # repository@commit path, line
    convention: str  # "last" or "best"
    secondary: bool = False  # read from another repository's copy of the paper's table
    note: str = ""
    dataset: Optional[str] = None  # the setting the figure was trained in (the table's `setting`), when known
    epochs: Optional[int] = None


@dataclass(frozen=True)
class Paper:
    """A paper's CIFAR-100 figures by (method, pair), with its citation and its reporting convention."""

    name: str
    citation: str
    short: str
    convention: str
    convention_evidence: str
    statistic: str
    figures: dict[tuple[str, str], tuple[Figure, ...]]
    empty: dict[tuple[str, str], str] = field(default_factory=dict)  # cells a source leaves empty (N/A): its note


def names() -> list[str]:
    """The papers the data file holds."""
    return sorted(_raw())


def load(name: str) -> Paper:
    """The figures of one paper; an unknown name raises ValueError listing the known ones."""
    raw = _raw()
    if name not in raw:
        raise ValueError(f"no published results named {name!r}: known are {', '.join(sorted(raw))}")
    entry = raw[name]
    cells: dict[tuple[str, str], list[Figure]] = {}
    empty: dict[tuple[str, str], str] = {}
    for table in entry["tables"]:
        for figure_ in _table_figures(name, entry, table):
            cells.setdefault((figure_.method, figure_.pair), []).append(figure_)
        empty.update(_empty_cells(table))
    return Paper(name, entry["citation"], entry["short"], _convention(entry, name), entry["convention_evidence"],
                 entry["statistic"], {key: tuple(figs) for key, figs in cells.items()},
                 {key: note for key, note in empty.items() if key not in cells})


def figures(paper: Paper, method: str, pair: str) -> tuple[Figure, ...]:
    """Every figure of a cell (several where sources disagree); method may be a kd.report name ("CE (no teacher)")."""
    return paper.figures.get((REPORT_NAMES.get(method, method), pair), ())


def not_applicable(paper: Paper, method: str, pair: str) -> Optional[str]:
    """The source's note on a cell it leaves empty (FSP's "N/A"), or None for a cell it fills or does not have."""
    return paper.empty.get((REPORT_NAMES.get(method, method), pair))


def figure(paper: Paper, method: str, pair: str) -> Optional[Figure]:
    """The cell's first figure (from the paper's own repository when it has one), or None."""
    found = figures(paper, method, pair)
    return found[0] if found else None


def methods(paper: Paper) -> list[str]:
    """The paper's methods (rows), in the data file's order."""
    return list(dict.fromkeys(method for method, _ in paper.figures))


def pairs(paper: Paper) -> list[str]:
    """The paper's teacher -> student pairs (columns), in the data file's order."""
    return list(dict.fromkeys(pair for _, pair in paper.figures))


def cite(figure_: Figure) -> str:
    """The figure with its paper, table and convention, for a table's footnote."""
    paper = load(figure_.paper)
    return f"{figure_.top1:.2f} ({paper.short}, {figure_.table}, {figure_.convention} epoch)"


@functools.lru_cache(maxsize=None)
def _raw() -> dict[str, Any]:
    """The papers of DATA_FILE, with the tables of the other data files (ImageNet) added to their papers."""
    folder = resources.files("kd").joinpath("published")
    papers = yaml.safe_load(folder.joinpath(DATA_FILE).read_text(encoding="utf-8"))
    for extra in sorted(p for p in folder.iterdir() if p.name.endswith(".yaml") and p.name != DATA_FILE):
        for name, entry in yaml.safe_load(extra.read_text(encoding="utf-8")).items():
            papers[name]["tables"] = papers[name]["tables"] + entry["tables"]
    return papers


def _convention(node: dict[str, Any], where: str) -> str:
    convention = node["convention"]
    if convention not in CONVENTIONS:
        raise ValueError(f"{where}: convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    return convention


def _table_figures(name: str, entry: dict[str, Any], table: dict[str, Any]) -> list[Figure]:
    """The non-empty cells of one table block, each with its row's source line and convention."""
    columns = table["columns"]
    found = []
    for method, row in table["rows"].items():
        if len(row["top1"]) != len(columns):
            raise ValueError(f"{name} {table['table']} {method}: {len(row['top1'])} values for {len(columns)} pairs")
        convention = _convention(row, f"{name} {method}") if "convention" in row else _convention(entry, name)
        # A repository file's line, or (a paper's own table, no stored copy) where in the paper.
        source = f"{table['source']} line {row['line']}" if "line" in row else f"{table['source']} {row['at']}"
        setting = table.get("setting", {})
        for pair, top1 in zip(columns, row["top1"]):
            if top1 is not None:  # the source leaves this cell empty (e.g. N/A)
                found.append(Figure(float(top1), str(method), pair, name, table["table"], source, convention,
                                    bool(table.get("secondary", False)), row.get("note", ""),
                                    setting.get("dataset"), setting.get("epochs")))
    return found


def _empty_cells(table: dict[str, Any]) -> dict[tuple[str, str], str]:
    """The cells of a table block that its source leaves empty, with the row's note."""
    return {(str(method), pair): row.get("note", "") for method, row in table["rows"].items()
            for pair, top1 in zip(table["columns"], row["top1"]) if top1 is None}
