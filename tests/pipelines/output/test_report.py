"""The run report renders in headless Chromium with every plot present, from a real job's commits."""

import base64
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.cli import main
from pipelines.embed.config import EmbedJobConfig
from pipelines.embed.job import run_embed
from pipelines.output.report import REPORT_FILE

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PLOTS = ["throughput", "lengths", "padding", "rejects"]


@pytest.fixture(scope="module")
def finished_output(ray_local, tmp_path_factory, tiny_embedding_model):
    root = tmp_path_factory.mktemp("report")
    (root / "corpus").mkdir()
    texts = [("word " * (1 + (i * 7) % 90)).strip() for i in range(120)]
    texts[5] = None
    pq.write_table(pa.table({"text": texts}), root / "corpus" / "a.parquet", row_group_size=30)
    out = root / "out"
    summary = run_embed(EmbedJobConfig.model_validate({
        "input": {"paths": [str(root / "corpus")], "rows_per_item": 30},
        "model": {"path": str(tiny_embedding_model), "max_length": 64, "max_batch_tokens": 512},
        "output": {"path": str(out)},
    }))
    return out, summary


def test_report_has_every_plot_and_the_totals(finished_output):
    out, summary = finished_output
    page = (out / REPORT_FILE).read_text()
    for name in PLOTS:
        data = re.search(rf'id="{name}" alt="{name}" src="data:image/png;base64,([^"]+)"', page).group(1)
        assert base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n")
    assert "<td>119</td>" in page and "<td>1</td>" in page
    efficiency = float(re.search(r"padding efficiency</th><td>([\d.]+)%", page).group(1))
    assert 0 < efficiency <= 100
    assert summary["totals"]["rows"] == 119

    (out / REPORT_FILE).unlink()
    assert main(["report", str(out)]) == 0 and (out / REPORT_FILE).exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it where it can)")
def test_report_renders_in_headless_chromium(finished_output, tmp_path):
    from playwright.sync_api import sync_playwright

    out, _ = finished_output
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto((out / REPORT_FILE).as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate("[...document.images].map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight])")
        title = page.title()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert title == "embedrank run report"
    assert [s[0] for s in sizes] == PLOTS
    assert all(complete and w > 300 and h > 150 for _, complete, w, h in sizes), sizes
    assert (tmp_path / "report.png").stat().st_size > 20_000
