"""The HTML report and the command line, on runs whose tail and receptive-field border are known."""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from delve.__main__ import main
from delve.analysis import diagnose
from delve.probes import ProbeResult
from delve.receptive_field import save_receptive_fields, unproductive_layers

pytest.importorskip("matplotlib", reason="the report draws its figures with matplotlib")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def cnn() -> nn.Sequential:
    """Receptive fields 3, 5, (6, j=2), 10, 14, 18, 22: at 8 px layers 4, 5 and 6 are unproductive."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


LAYERS = ["0", "1", "3", "4", "5", "6", "9"]
WIDTHS = [4, 4, 8, 8, 8, 8, 3]


def write_run(savefile: Path, last_idim: list, epochs: int = 4, with_eval: bool = True, idim: bool = True) -> None:
    """A CSV as the tracker writes it (``;``-separated, unnamed epoch index): saturation, intrinsic
    dimensionality (saturation times width) and a user scalar; epochs move from 80% of each width to ``last_idim``."""
    rng = np.random.default_rng(0)
    rows = []
    for epoch in range(epochs):
        weight = (epoch + 1) / epochs
        row = {"accuracy": 0.3 + 0.15 * epoch}
        for mode in ("train", "eval") if with_eval else ("train",):
            for name, width, last in zip(LAYERS, WIDTHS, last_idim):
                dims = round(0.8 * width * (1 - weight) + last * weight)
                if mode == "eval":
                    dims = int(np.clip(dims + rng.integers(-1, 2) * (epoch < epochs - 1), 1, width))
                row[f"{mode}-saturation_{name}"] = dims / width
                if idim:
                    row[f"{mode}-intrinsic-dimensionality_{name}"] = dims
        rows.append(row)
    savefile.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(f"{savefile}.csv", sep=";")
    savefile.mkdir(exist_ok=True)


TAIL_RUN = [2, 3, 6, 1, 1, 2, 2]  # layers 4 and 5 far below the rest; 6 feeds the 3-way classifier at 2 dimensions
FLAT_RUN = [2, 3, 6, 6, 5, 7, 2]


def table_rows(page: str) -> dict:
    """Layer name -> the row's HTML, from the report's layer table."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page.split("<h2>Layers</h2>")[1], flags=re.S)
    found = {}
    for row in rows:
        match = re.search(r"<td><code>([^<]+)</code></td>", row)
        if match:
            found[match.group(1)] = row
    return found


def embedded_pngs(page: str) -> list:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def findings_in(page: str) -> list:
    """``(severity, kind)`` of every finding box, in page order."""
    return re.findall(r"<div class='rec (\w+)'><div class='kind'>[^<]*· ([\w-]+)</div>", page)


def test_report_renders_the_findings_with_evidence_and_is_self_contained(tmp_path) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    model = cnn()
    # 3, 5, + 1 -> 6 at the pool (j=2), then + 4 each: 10, 14, 18, 22; layer 4's input (10) is >= 8 already
    assert unproductive_layers(model, (1, 8, 8)) == ["4", "5", "6"]
    save_receptive_fields(str(savefile / "receptive_fields.json"), model, (1, 8, 8))
    assert main(["report", str(savefile) + os.sep]) == 0
    page = (savefile / "report.html").read_text()

    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from outside the file
    pngs = embedded_pngs(page)
    assert len(pngs) == 4  # saturation heatmaps, idim heatmaps, last epoch, other logged values
    for png in pngs:
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.shape[0] > 150 and image.shape[1] > 400
    assert plt.get_fignums() == []  # no figure left open

    # Exactly the findings of diagnose, in its order, each with its evidence.
    expected = diagnose(str(savefile))
    assert findings_in(page) == [(f.severity, f.kind) for f in expected]
    assert findings_in(page)[:2] == [("warn", "tail"), ("info", "unproductive")]
    assert "Raise the input resolution to at least 24 px" in page
    assert "<b>peer median</b> 0.75" in page and "<b>suggestion</b> action: raise-resolution; input_size: 24" in page
    evidence = re.search(r"<table class='evidence'>(.*?)</table>", page, flags=re.S).group(1)
    assert "<th>width</th>" in evidence and "<th>train sat.</th>" in evidence and "<th>eval idim</th>" in evidence
    assert re.search(r"<code>4</code></td><td class='num'>8</td><td class='num'>\?</td><td class='num'>0.125</td>"
                     r"<td class='num'>1</td>", evidence)

    rows = table_rows(page)
    assert list(rows) == LAYERS
    assert [n for n, row in rows.items() if "tag tail" in row] == ["4", "5"]
    assert [n for n, row in rows.items() if "tag rf" in row] == ["6"]
    assert "collapse-before-classifier" in rows["6"]
    # receptive fields in the table: inputs 14 and 18, own 18 and 22 (see cnn's docstring)
    assert re.search(r">14<.*?>18<", rows["5"]) and re.search(r">18<.*?>22<", rows["6"])
    # width, then per mode samples (unknown here), saturation and intrinsic dimensionality
    assert re.search(r"<td class='num'>8</td><td class='num'>\?</td><td class='num'>0.25</td><td class='num'>2</td>",
                     rows["6"])


def test_report_without_tail_or_receptive_fields(tmp_path) -> None:
    savefile = tmp_path / "flat"
    write_run(savefile, FLAT_RUN, with_eval=False, idim=False)
    output = tmp_path / "elsewhere" / "flat.html"
    from delve.report import report

    assert report(str(savefile) + ".csv", output=str(output)) == str(output)
    page = output.read_text()
    assert findings_in(page) == [("ok", "no-tail"), ("info", "samples-unknown")]
    assert "tag tail" not in page and "tag rf" not in page
    assert "eval sat." not in page
    assert len(embedded_pngs(page)) == 3  # no intrinsic dimensionality: no second heatmap


def test_report_on_a_tail_without_receptive_fields_names_no_cause(tmp_path) -> None:
    savefile = tmp_path / "dense"
    write_run(savefile, TAIL_RUN)
    from delve.report import report

    page = Path(report(str(savefile))).read_text()
    assert findings_in(page)[0] == ("info", "tail")
    assert [n for n, row in table_rows(page).items() if "tag tail" in row] == ["4", "5"]
    assert "the cause is not shown" in page
    assert "Raise the input resolution" not in page and "remove" not in page.lower()


def test_report_traces_a_given_model_and_shows_probes(tmp_path) -> None:
    from delve.report import report

    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    probes = {n: ProbeResult(n, 4, 0.9, 0.5 + 0.05 * i) for i, n in enumerate(LAYERS)}
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 8, 8), probes=probes)).read_text()
    rows = table_rows(page)
    assert [n for n, row in rows.items() if "tag rf" in row] == ["6"]
    assert "probe test acc." in page and "75.0%" in rows["6"]
    assert "Linear probes reach 60.0% before the tail and 70.0% within it: they still lift accuracy, so keep them" in page
    flat = {n: ProbeResult(n, 4, 0.95, 0.9) for n in LAYERS}
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 8, 8), probes=flat)).read_text()
    assert "they add no probe accuracy" in page
    # At 32 px every layer's input is smaller than the image: the tail is not a resolution problem.
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 32, 32))).read_text()
    assert "tag rf" not in page and findings_in(page)[0] == ("info", "tail")
    assert "their receptive fields still fit the 32×32 px input, so resolution is not the cause" in page
    with pytest.raises(FileNotFoundError, match="receptive_fields"):
        report(str(savefile), receptive_fields=str(tmp_path / "missing.json"))


def test_idim_heatmaps_share_one_scale_relative_to_the_width(tmp_path) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    from delve.report import report

    page = Path(report(str(savefile))).read_text()
    assert "Intrinsic dimensionality per layer over epochs" in page
    heatmap = matplotlib.image.imread(io.BytesIO(embedded_pngs(page)[1]), format="png")
    assert heatmap.shape[1] > 600  # train and eval side by side
    assert "share of the layer's width (in brackets), one scale for train and eval" in page


def test_command_line_tail_and_errors(tmp_path, capsys) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN, idim=False)
    # find_tail judges every layer but the output one: 4, 5 and the collapsing 6
    assert main(["tail", str(savefile)]) == 0
    assert capsys.readouterr().out.split() == ["4", "5", "6"]
    assert main(["tail", str(savefile), "--mode", "eval"]) == 0
    assert capsys.readouterr().out.split() == ["4", "5", "6"]
    write_run(tmp_path / "flat", FLAT_RUN)
    assert main(["tail", str(tmp_path / "flat")]) == 0
    assert capsys.readouterr().out.strip() == "no tail"
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "no run at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tail", str(savefile), "--mode", "test"])


def test_python_dash_m_delve_report(tmp_path) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN, epochs=2)
    done = subprocess.run(
        [sys.executable, "-m", "delve", "report", str(savefile)], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(savefile / "report.html")
    assert (savefile / "report.html").stat().st_size > 10_000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    save_receptive_fields(str(savefile / "receptive_fields.json"), cnn(), (1, 8, 8))
    assert main(["report", str(savefile)]) == 0
    screenshot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--screenshot={screenshot}",
         "--window-size=1200,1600", (savefile / "report.html").as_uri()],
        capture_output=True, timeout=120, check=False,
    )
    assert screenshot.is_file(), "chromium wrote no screenshot"
    pixels = matplotlib.image.imread(str(screenshot))[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    # The page rendered: the red tail callout and the viridis heatmap are on screen, not a blank page.
    red = (pixels[..., 0] > 0.75) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 500
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 500


def test_report_shows_every_logged_statistic_or_those_asked_for(tmp_path):
    from delve import SaturationTracker
    from delve.report import report

    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 5))
    savefile = str(tmp_path / "spectral")
    with SaturationTracker(savefile, "csv", model, stats=["lsat", "idim", "erank", "pr", "trc"]) as tracker:
        for _ in range(3):
            model(torch.randn(64, 6))
            tracker.add_saturations()
    page = open(report(savefile)).read()
    for title in ("Effective rank per layer over epochs", "Participation ratio per layer over epochs",
                  "Covariance trace per layer over epochs"):
        assert title in page, title
    only = open(report(savefile, statistics=["erank"], output=str(tmp_path / "only.html"))).read()
    assert "Effective rank per layer over epochs" in only and "Participation ratio" not in only
    with pytest.raises(ValueError, match="statistics=\\['srank'\\] are not in this run"):
        report(savefile, statistics=["srank"])
    assert main(["report", savefile, "--statistics", "pr", "-o", str(tmp_path / "cli.html")]) == 0
    assert "Participation ratio per layer" in (tmp_path / "cli.html").read_text()
