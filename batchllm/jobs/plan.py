"""Work units: contiguous row ranges of one shard, planned deterministically; chunk file names."""
from __future__ import annotations

import re
from dataclasses import dataclass

CHUNK_RE = re.compile(r"^unit-(\d+)-chunk-(\d+)(-last)?\.arrow$")


@dataclass(frozen=True, slots=True)
class WorkUnit:
    index: int
    shard: int
    start: int  # first row (inclusive)
    stop: int  # last row (exclusive)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


def plan_units(shard_rows: list[int], unit_rows: int) -> list[WorkUnit]:
    """Split each shard, in order, into units of at most `unit_rows` rows (same input, same plan)."""
    units: list[WorkUnit] = []
    for shard, n in enumerate(shard_rows):
        for start in range(0, n, unit_rows):
            units.append(WorkUnit(len(units), shard, start, min(n, start + unit_rows)))
    return units


def chunk_name(unit: int, chunk: int, last: bool) -> str:
    """`unit-000003-chunk-00001.arrow`; the unit's final chunk ends in `-last.arrow`."""
    return f"unit-{unit:06d}-chunk-{chunk:05d}{'-last' if last else ''}.arrow"


def parse_chunk_name(name: str) -> tuple[int, int, bool] | None:
    m = CHUNK_RE.match(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2)), m.group(3) is not None
