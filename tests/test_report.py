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
from torch import nn

from delve.__main__ import main
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


def write_run(savefile: Path, last_train: list, epochs: int = 4, with_eval: bool = True) -> None:
    """A CSV as the tracker writes it: ``;``-separated, unnamed epoch index, saturation and a user scalar."""
    rng = np.random.default_rng(0)
    rows = []
    for epoch in range(epochs):
        weight = (epoch + 1) / epochs
        train = [0.8 * (1 - weight) + v * weight for v in last_train]
        row = {"accuracy": 0.3 + 0.15 * epoch}
        row.update({f"train-saturation_{n}": v for n, v in zip(LAYERS, train)})
        if with_eval:
            row.update({f"eval-saturation_{n}": min(1.0, v + rng.uniform(-0.03, 0.03)) for n, v in zip(LAYERS, train)})
        rows.append(row)
    savefile.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(f"{savefile}.csv", sep=";")
    savefile.mkdir(exist_ok=True)


TAIL_RUN = [0.45, 0.7, 0.75, 0.72, 0.1, 0.06, 0.8]  # layers 5 and 6 far below the rest; the output layer is not
FLAT_RUN = [0.45, 0.7, 0.75, 0.72, 0.68, 0.7, 0.8]


def table_rows(page: str) -> dict:
    """Layer name -> the row's HTML, from the report's layer table."""
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", page, flags=re.S)
    found = {}
    for row in rows:
        match = re.search(r"<td><code>([^<]+)</code></td>", row)
        if match:
            found[match.group(1)] = row
    return found


def embedded_pngs(page: str) -> list:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([^']+)'", page)]


def test_report_marks_tail_and_border_and_is_self_contained(tmp_path) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    model = cnn()
    # 3, 5, + 1 -> 6 at the pool (j=2), then + 4 each: 10, 14, 18, 22; layer 4's input (10) is >= 8 already
    assert unproductive_layers(model, (1, 8, 8)) == ["4", "5", "6"]
    save_receptive_fields(str(savefile / "receptive_fields.json"), model, (1, 8, 8))
    path = main(["report", str(savefile)])
    assert path == 0
    page = (savefile / "report.html").read_text()

    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing loaded from outside the file
    pngs = embedded_pngs(page)
    assert len(pngs) == 4  # heatmap, last epoch, eval vs train, other logged values
    for png in pngs:
        image = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert image.shape[0] > 150 and image.shape[1] > 400
    assert plt.get_fignums() == []  # no figure left open

    rows = table_rows(page)
    assert list(rows) == LAYERS
    assert [n for n, row in rows.items() if "tag tail" in row] == ["5", "6"]
    assert [n for n, row in rows.items() if "tag rf" in row] == ["4", "5", "6"]
    assert "add nothing at this input size" in page and "<code>5</code> and <code>6</code>" in page
    assert "Layer <code>4</code> receives an input that already sees the whole 8×8 px input" in page  # unproductive, but not (yet) in the tail
    assert "larger than 18 px" in page
    assert "Increase the input resolution or remove them" in page
    assert "8×8 px" in page
    # receptive fields in the table: inputs 14 and 18, own 18 and 22 (see cnn's docstring)
    assert re.search(r">14<.*?>18<", rows["5"]) and re.search(r">18<.*?>22<", rows["6"])


def test_report_without_tail_or_receptive_fields(tmp_path) -> None:
    savefile = tmp_path / "flat"
    write_run(savefile, FLAT_RUN, with_eval=False)
    output = tmp_path / "elsewhere" / "flat.html"
    from delve.report import report

    assert report(str(savefile) + ".csv", output=str(output)) == str(output)
    page = output.read_text()
    assert "No tail" in page and "tag tail" not in page and "tag rf" not in page
    assert "eval saturation" not in page
    assert len(embedded_pngs(page)) == 4


def test_report_on_a_tail_without_receptive_fields_blames_width_not_resolution(tmp_path) -> None:
    # Nothing says the input size is the cause (dense layers, or no model given): no resolution advice.
    savefile = tmp_path / "dense"
    write_run(savefile, TAIL_RUN)
    from delve.report import report

    page = Path(report(str(savefile))).read_text()
    assert [n for n, row in table_rows(page).items() if "tag tail" in row] == ["5", "6"]
    assert "<code>5</code> and <code>6</code> add little" in page
    assert "Make them narrower or remove them" in page
    assert "Increase the input resolution" not in page


def test_report_traces_a_given_model_and_shows_probes(tmp_path) -> None:
    from delve.report import report

    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    probes = {n: ProbeResult(n, 4, 0.9, 0.5 + 0.05 * i) for i, n in enumerate(LAYERS)}
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 8, 8), probes=probes)).read_text()
    rows = table_rows(page)
    assert [n for n, row in rows.items() if "tag rf" in row] == ["4", "5", "6"]
    assert "probe test acc." in page and "75.0%" in rows["6"]
    assert "Probes: the best layer before the tail reaches 65.0% test accuracy, the tail 75.0%; the tail still" in page
    flat = {n: ProbeResult(n, 4, 0.95, 0.9) for n in LAYERS}
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 8, 8), probes=flat)).read_text()
    assert "the tail 90.0%; the tail barely improves on the layers before it" in page
    # At 32 px every layer's input is smaller than the image: the tail is not a resolution problem.
    page = Path(report(str(savefile), model=cnn(), input_size=(1, 32, 32))).read_text()
    assert "tag rf" not in page and "add nothing" not in page
    assert "Layers <code>5</code> and <code>6</code> sit far below the rest" in page
    assert "their receptive fields still fit the input" in page and "No layer is unproductive" in page
    with pytest.raises(ValueError, match="input_size"):
        report(str(savefile), model=cnn())
    with pytest.raises(FileNotFoundError, match="receptive_fields"):
        report(str(savefile), receptive_fields=str(tmp_path / "missing.json"))


def test_command_line_tail_and_errors(tmp_path, capsys) -> None:
    savefile = tmp_path / "run"
    write_run(savefile, TAIL_RUN)
    assert main(["tail", str(savefile)]) == 0
    assert capsys.readouterr().out.split() == ["5", "6"]
    assert main(["tail", str(savefile), "--mode", "eval"]) == 0
    assert capsys.readouterr().out.split() == ["5", "6"]
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
