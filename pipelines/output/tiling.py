"""Choosing piece files that cover a work item's rows exactly once.

Retries and re-executed tasks may report duplicate or overlapping pieces; a
commit needs a subset whose ranges tile `[start, end)` with no gap and no
overlap. Ranges are edges of a graph over row positions; a tiling is a path.
"""

from __future__ import annotations

from collections import defaultdict, deque


def find_tiling(ranges: list[tuple[int, int]], start: int, end: int) -> list[int] | None:
    """Indices into `ranges` (half-open) that tile `[start, end)` in order, or None if none does."""
    if start == end:
        return []
    edges: dict[int, list[int]] = defaultdict(list)
    for i, (lo, hi) in enumerate(ranges):
        if start <= lo < hi <= end:
            edges[lo].append(i)
    came_by: dict[int, int] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        pos = queue.popleft()
        for i in edges[pos]:
            nxt = ranges[i][1]
            if nxt not in seen:
                seen.add(nxt)
                came_by[nxt] = i
                if nxt == end:
                    path = []
                    while nxt != start:
                        path.append(came_by[nxt])
                        nxt = ranges[came_by[nxt]][0]
                    return path[::-1]
                queue.append(nxt)
    return None
