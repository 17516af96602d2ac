"""GrammarBitmask: the allowed tokens of a plan's constrained rows, as the runner receives them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class GrammarBitmask:
    """One bit per token id (bit t % 32 of word t // 32; 1 = allowed) for each constrained
    request that the plan samples; requests not named here are unconstrained. Keyed by request
    id, so a plan split in halves (out of memory) still finds each row's mask."""

    req_ids: list[str]
    bitmask: np.ndarray  # [len(req_ids), ceil(vocab / 32)] int32

    def rows_in(self, sample_req_ids: list[str]) -> tuple[list[int], list[int]]:
        """(rows of `sample_req_ids` that have a mask, the matching rows of `bitmask`)."""
        where = {rid: i for i, rid in enumerate(sample_req_ids)}
        rows, masks = [], []
        for j, rid in enumerate(self.req_ids):
            i = where.get(rid)
            if i is not None:
                rows.append(i)
                masks.append(j)
        return rows, masks


def allowed(bitmask: np.ndarray, token: int) -> bool:
    """Whether one mask row allows `token` (tests and checks)."""
    return bool((int(bitmask[token // 32]) >> (token % 32)) & 1)
