"""Commit tiling: duplicate and overlapping piece reports resolve to one exact tiling."""

from pipelines.output.tiling import find_tiling


def covered(ranges, path):
    return [ranges[i] for i in path]


def test_exact_pieces_tile():
    ranges = [(0, 10), (10, 25), (25, 30)]
    assert covered(ranges, find_tiling(ranges, 0, 30)) == ranges


def test_gap_means_no_tiling_yet():
    assert find_tiling([(0, 10), (12, 30)], 0, 30) is None


def test_duplicates_and_overlaps_resolve_to_one_exact_tiling():
    ranges = [(0, 10), (0, 10), (5, 20), (10, 20), (10, 15), (15, 30), (20, 30), (0, 7)]
    path = find_tiling(ranges, 0, 30)
    tiles = covered(ranges, path)
    assert tiles[0][0] == 0 and tiles[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))
    assert len(set(path)) == len(path)


def test_ranges_outside_the_item_are_ignored_and_offsets_respected():
    assert covered([(90, 100), (100, 150), (150, 210)], find_tiling([(90, 100), (100, 150), (150, 210)],
                                                                     100, 150)) == [(100, 150)]
    assert find_tiling([], 5, 5) == []
