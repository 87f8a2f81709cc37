"""Progress shows on a timer as well as per committed item: a job whose items take long still prints lines."""

import io
import threading

from pipelines.output.records import ItemCommit
from pipelines.progress import Progress


class _Lines(io.StringIO):
    """A non-terminal stream that signals each line written."""

    def __init__(self):
        super().__init__()
        self.wrote = threading.Event()

    def write(self, text):
        n = super().write(text)
        if "\n" in text:
            self.wrote.set()
        return n


def test_a_line_appears_on_the_timer_while_no_item_commits():
    stream = _Lines()
    progress = Progress(total_items=4, done_items=1, known_rows=40, interval=0.05, stream=stream)
    with progress.ticking():
        for _ in range(2):  # two timer lines, no commit in between
            assert stream.wrote.wait(60)
            stream.wrote.clear()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("[embed] items 1/4 (25%) · rows 0 ") for line in lines), lines
    # and the timer stops with the block
    progress_lines = len(lines)
    assert not stream.wrote.wait(0.5) and len(stream.getvalue().splitlines()) == progress_lines


def test_a_commit_prints_a_line_and_the_timer_does_not_repeat_it_within_the_interval():
    stream = _Lines()
    progress = Progress(total_items=2, done_items=0, known_rows=20, interval=3600, stream=stream)
    commit = ItemCommit(item="a", fingerprint_id="f", source="a.parquet", row_start=0, row_end=10, rows=10,
                        tokens=100)
    with progress.ticking():
        progress._last -= 3600  # the interval has passed since the start
        progress.update(commit)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[embed] items 1/2 (50%) · rows 10 (+0 rejected)"), lines
