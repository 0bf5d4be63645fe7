"""report.html from a real `throttllem replay`, rendered by headless Chromium: tables, plots, pixels."""

import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.cli import main
from tests.unit.test_html_report import parsed

POLICIES = ("max", "static:1050")
PLOTS_PER_GROUP = 4
CHROMIUM_TIMEOUT_S = 60
# On this closed network Chromium must not try to reach anything (updates, sync, QUIC probes).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium with a fresh profile; fail (not skip) when it is not installed."""
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not installed: `apt-get install -y --no-install-recommends chromium` "
            "(.ci/run installs it)"
        )
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    done = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The smallest replay that makes a real report: 10 s of trace, two policies, no LP limits."""
    out = tmp_path_factory.mktemp("replay")
    argv = ["replay", "--trace", "azure-conv", "--start", "600", "--duration", "10"]
    argv += [
        "--policies",
        ",".join(POLICIES),
        "--rate-scale",
        "1",
        "--no-limits",
        "--out",
        str(out),
        "--json",
    ]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, json.loads(stdout.getvalue())


def test_chromium_renders_the_tables_and_every_plot_from_data_uris(
    replayed: tuple[Path, dict], tmp_path: Path
) -> None:
    out, results = replayed
    dom = chromium(tmp_path, "--dump-dom", (out / "report.html").as_uri()).stdout
    page = parsed(dom)
    (group,) = results["groups"]
    assert [cell for cell in page.cells if cell in POLICIES] == list(group["policies"])  # one row each
    assert "SLO attainment" in page.cells and "TPOT p50 / p99 ms" in page.cells
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert len(images) == len(group["plots"]) == PLOTS_PER_GROUP
    assert all((attrs.get("src") or "").startswith("data:image/png;base64,") for attrs in images)
    assert sum(tag == "figure" for tag, _ in page.tags) == PLOTS_PER_GROUP


def test_the_page_is_drawn_with_its_plots_not_blank(replayed: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = replayed
    shot = tmp_path / "page.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", (out / "report.html").as_uri())
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # not blank: text, shading, plots
    # Only the plots' lines are strongly coloured (the page itself is greys): with the images
    # replaced by broken ones this count was 132, with the plots drawn about 18,000.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 60
    assert saturated.sum() > 5000
