"""The report and the terminal views of real runs on MNIST."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from coordinator.config import RunConfig, load_config_file
from coordinator.report import FIGURES_DIR, REPORT_HTML, default_rounds, heatmap_path
from coordinator.results import PHASES, load_results
from tests.e2e.runner import coordinator
from tests.support import require_tool

pytestmark = pytest.mark.e2e
CURVES = ("accuracy_loss.png", "swap_rate.png", "disagreement.png")


def expected_pngs(run_dir: Path, rounds: list[int]) -> list[Path]:
    figures = run_dir / FIGURES_DIR
    return [figures / name for name in CURVES] + [heatmap_path(figures, r, phase) for r in rounds for phase, _ in PHASES]


def test_run_ends_with_the_report_path_and_writes_every_png(two_round_run):
    stdout, results, run_dir = two_round_run
    assert stdout.splitlines()[-1] == f"report: {run_dir / REPORT_HTML}"
    for png in expected_pngs(run_dir, default_rounds(len(results["rounds"]))):
        assert png.stat().st_size > 10_000, png
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 300
            image.verify()


def test_report_html_is_self_contained(two_round_run):
    _, results, run_dir = two_round_run
    page = (run_dir / REPORT_HTML).read_text()
    assert not re.search(r"https?://", page), "report.html references an external URL"
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert len(sources) == len(CURVES) + 4 * len(default_rounds(len(results["rounds"])))
    for item in results["rounds"]:  # the summary table holds every round's figures
        for evaluation in item["evaluations"]:
            assert f"{evaluation['accuracy']:.4f} / {evaluation['swap_rate']:.3f}" in page


def test_report_all_rounds_on_request(two_round_run, tmp_path):
    _, results, run_dir = two_round_run
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(FIGURES_DIR, REPORT_HTML))
    done = coordinator("report", str(copy), "--rounds", "all")
    assert done.returncode == 0, done.stderr
    assert all(p.exists() for p in expected_pngs(copy, list(range(len(results["rounds"])))))
    bad = coordinator("report", str(copy), "--rounds", "7")
    assert bad.returncode == 2 and "not [7]" in bad.stderr


def test_report_renders_in_headless_chromium(two_round_run, tmp_path):
    browser = require_tool(("chromium", "chromium-browser"), "apt-get install chromium (.ci/run installs it)")
    driver = require_tool(("chromedriver",), "apt-get install chromium-driver (.ci/run installs it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, _, run_dir = two_round_run
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        driver.get((run_dir / REPORT_HTML).as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt}))"
        )
        console = driver.get_log("browser")
    finally:
        driver.quit()
    assert len(images) == len(CURVES) + 8
    assert all(image["complete"] and image["width"] > 0 for image in images), [i for i in images if not i["width"]]
    errors = [entry for entry in console if entry["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors


def numbers(line: str) -> list[str]:
    return re.findall(r"[-+]?\d+(?:\.\d+)?", line)


def test_show_prints_the_matrix_and_per_class_scores(two_round_run):
    _, results, run_dir = two_round_run
    done = coordinator("show", str(run_dir), "--round", "1", "--phase", "keras_trained")
    assert done.returncode == 0, done.stderr
    evaluation = next(e for e in results["rounds"][1]["evaluations"] if e["phase"] == "keras_trained")
    lines = done.stdout.splitlines()
    assert f"round 1 - keras_trained - keras: accuracy {evaluation['accuracy']:.4f}" in lines[0]
    rows = [numbers(line) for line in lines]
    for true, row in enumerate(evaluation["confusion_matrix"]):
        assert [str(true), *map(str, row)] in rows, f"row {true} of the confusion matrix is missing"
    for c in evaluation["per_class"]:
        expected = [str(c["label"]), f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"])]
        assert expected in rows, f"per-class line of label {c['label']} is missing"
    everything = coordinator("show", str(run_dir))  # the last round, all four phases
    assert everything.stdout.count("confusion matrix") == 4
    assert f"round {len(results['rounds']) - 1} - torch_trained" in everything.stdout
    missing = coordinator("show", str(run_dir.parent / "no-such-run"))
    assert missing.returncode == 2 and "holds no results.json" in missing.stderr


@pytest.fixture(scope="module")
def short_json_run(tmp_path_factory, torch_worker, keras_worker):
    """A 1-round identity/identity run against already running workers, with --json."""
    out = tmp_path_factory.mktemp("json-run")
    done = coordinator("run", "--torch", torch_worker.address, "--keras", keras_worker.address, "--rounds", "1",
                       "--torch-objective", "identity", "--max-train-samples", "3000", "--json", "--out", str(out))
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    return events, next(out.iterdir())


def test_json_output_is_one_event_per_line(short_json_run):
    events, run_dir = short_json_run
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-3:] == ["done", "step", "report"]
    assert kinds.count("evaluation") == 2 + 4  # the initial sync's two, then the round's four
    assert "train_progress" in kinds and "step" in kinds
    results = load_results(run_dir)
    assert [e["accuracy"] for e in events if e["event"] == "evaluation"][2:] == [e["accuracy"] for e in results["rounds"][0]["evaluations"]]


def test_compare_prints_per_phase_differences(two_round_run, short_json_run):
    _, a, run_a = two_round_run
    _, run_b = short_json_run
    b = load_results(run_b)
    done = coordinator("compare", str(run_a), str(run_b))
    assert done.returncode == 0, done.stderr
    assert "torch_objective: swap:1,7 -> identity" in done.stdout
    last_a, last_b = a["rounds"][-1]["evaluations"], b["rounds"][-1]["evaluations"]
    for ea, eb in zip(last_a, last_b, strict=True):
        line = next(l for l in done.stdout.splitlines() if ea["phase"] in l)
        assert numbers(line) == [
            f"{ea['accuracy']:.4f}", f"{eb['accuracy']:.4f}", f"{eb['accuracy'] - ea['accuracy']:+.4f}",
            f"{ea['swap_rate']:.3f}", f"{eb['swap_rate']:.3f}", f"{eb['swap_rate'] - ea['swap_rate']:+.3f}",
        ]


def test_saved_config_repeats_the_run(two_round_run):
    _, results, run_dir = two_round_run
    assert RunConfig(**load_config_file(run_dir / "config.toml")).to_dict() == results["config"]
