"""Hydra's basic sweeper (the cartesian product of the swept values) less the jobs that `exclude` names.

A table whose grid holds a cell the paper leaves empty (FSP on wrn_40_2 -> wrn_40_1, N/A in the CRD paper: FSP needs
the student's channel counts to equal the teacher's) names that job here instead of launching a job that would be
refused and fail the whole multirun. conf/hydra/sweeper/grid.yaml selects it:

    defaults:
      - override /hydra/sweeper: grid
    hydra:
      sweeper:
        params: {experiment: ..., loss: ..., seed: ...}
        exclude:
          - {experiment: crd_wrn_40_2_wrn_40_1, loss: fsp}  # every job with both values

It lives in `hydra_plugins` because Hydra instantiates sweepers from that package only; kd.sweep records the same
filtered grid in sweep.json (kd.report's expected jobs).
"""
from typing import Any, Mapping, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override


def is_excluded(job: Sequence[str], exclude: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a job (its `key=value` overrides) has every value of one `exclude` entry."""
    if not exclude:
        return False
    parsed = OverridesParser.create().parse_overrides(list(job))
    values = {o.get_key_element(): o.get_value_element_as_str() for o in parsed}
    return any(all(values.get(str(key)) == str(value) for key, value in entry.items()) for entry in exclude)


def check_exclude(exclude: Any) -> list[dict[str, str]]:
    """The exclude entries as plain dicts of strings; ValueError naming an entry that is not a non-empty mapping."""
    entries = []
    for entry in exclude or []:
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"hydra.sweeper.exclude: {entry!r} is not a mapping of swept keys to values, e.g. "
                             "{experiment: crd_wrn_40_2_wrn_40_1, loss: fsp}")
        entries.append({str(key): str(value) for key, value in entry.items()})
    return entries


class GridSweeper(BasicSweeper):
    """The basic sweeper, in its order and batches, without the excluded jobs."""

    def __init__(self, max_batch_size: Optional[int], params: Optional[dict] = None,
                 exclude: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
        super().__init__(max_batch_size, params)
        self.exclude = check_exclude(exclude)

    def split_arguments(self, overrides: list[Override], max_batch_size: Optional[int]) -> list[list[list[str]]]:
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        kept = [job for job in jobs if not is_excluded(job, self.exclude)]
        if max_batch_size is None:
            return [kept]
        return [list(chunk) for chunk in BasicSweeper.split_overrides_to_chunks(kept, max_batch_size)]
