"""`qloc reproduce` on a tiny model runs every stage, and `qloc report` makes one self-contained
HTML file: findings beside the paper first, every table beside its figure, a per-fact explorer that
a headless browser drives fact by fact, and text from the data escaped everywhere."""

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import qloc
from qloc.report import open_in_browser, write_report
from qloc.report.sections import read_section
from tests.headless_browser import HeadlessChromium, find_browser
from tests.helpers import HOSTILE, QLOC

BROWSER = find_browser()


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("reproduce") / "run"
    command = [
        "reproduce",
        "--model",
        str(tiny_model_dir),
        "--facts",
        "3",
        "--run-dir",
        str(run),
        "--known",
        "1000",
        "--device",
        "cpu",
        "--quiet",
    ]
    result = subprocess.run(QLOC + command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def hostile_run(reproduced, tmp_path_factory):
    """A copy of the run whose first query's prompt and a case-study table hold :data:`HOSTILE`."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    shutil.copytree(reproduced, run)
    with sqlite3.connect(run / "qloc.sqlite") as db:
        db.execute("UPDATE kn_sets SET prompt = ? WHERE query_index = 0", (HOSTILE,))
    pd.DataFrame({"role": ["edited query"], "prompt": [HOSTILE], "before": ["x"], "after": ["y"]}).to_csv(
        run / "tables" / "table8.csv", index=False
    )
    return run


def _artifacts(tmp_path: Path) -> Path:
    """Where the browser test leaves its screenshots: $QLOC_ARTIFACTS (CI prints it), else tmp."""
    return Path(os.environ.get("QLOC_ARTIFACTS") or tmp_path)


def test_reproduce_runs_every_stage(reproduced):
    with qloc.RunStore.open_existing(reproduced) as store:
        stages = {s["stage"]: s["params"] for s in store.stages()}
        units = store.units()
    assert set(stages) == {
        "census",
        "localize",
        "edit-erase-amig",
        "edit-update-amig",
        "sequential-update-amig",
        "mapping-amig",
        "synapses-amig",
    }
    assert stages["localize"]["methods"] == ["ig", "amig", "sig"] and stages["localize"]["steps"] == 20
    assert (units.status == "done").all()
    for table in ("table1", "table2", "table3", "table7", "fig4_mapping", "fig6_synapses", "table6_cost"):
        assert (reproduced / "tables" / f"{table}.csv").exists(), table
    for figure in (
        "fig4_mapping",
        "fig5_heatmap",
        "fig6_synapses",
        "fig9_threshold",
        "fig11_dkn_distributions",
        "violin_sig",
    ):
        assert (reproduced / "figures" / f"{figure}.png").exists(), figure
    assert (reproduced / "report.html").exists() and (reproduced / "report.md").exists()


def test_rerun_resumes_without_recomputing(reproduced, tiny_model_dir):
    with qloc.RunStore.open_existing(reproduced) as store:
        before = store.units()
    command = QLOC + [
        "reproduce",
        "--model",
        str(tiny_model_dir),
        "--facts",
        "3",
        "--run-dir",
        str(reproduced),
        "--known",
        "1000",
        "--device",
        "cpu",
        "--quiet",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    # localize, erase, update, mapping, synapses: nothing recomputed
    assert result.stdout.count("0 done, ") == 5
    with qloc.RunStore.open_existing(reproduced) as store:
        pd.testing.assert_frame_equal(store.units(), before)
    # Another model in the same run directory is refused before anything runs, naming the parameter.
    other = subprocess.run(command[:3] + ["other-model"] + command[4:], capture_output=True, text=True)
    assert other.returncode == 2 and "model" in other.stderr


def test_reproduce_report_opens_with_the_findings_beside_the_paper(reproduced):
    page = (reproduced / "report.html").read_text()
    headings = re.findall(r"<h2[^>]*>(.*?)</h2>", page)
    assert headings[0].startswith("At a glance")
    glance = page[page.index("id='glance'") : page.index("Tables and figures")]
    for claim in (
        "Table 1 (R_KI",
        "Table 1 (Welch",
        "Table 2 (Gen of Self and Union",
        "Table 2 (dPPL)",
        "Table 3 (Avg of CAS",
        "Figure 4 (dProb",
        "Figure 6 (dKN",
    ):
        assert claim in glance, claim
    assert "paper (GPT-2)" in glance and "compared with GPT-2" in glance
    assert re.search(r"✓ agrees|✗ differs", glance)


def test_report_shows_every_table_beside_its_figure_in_the_papers_order(reproduced, tmp_path):
    written = write_report([reproduced], tmp_path / "report.html")
    page = written["html"].read_text()
    figures = sorted((reproduced / "figures").glob("*.png"))
    assert page.count("<img ") == len(figures) and 'src="http' not in page and "<link" not in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(figures)
    for csv in (reproduced / "tables").glob("*.csv"):
        assert f'download="{csv.name}"' in page
    body = page[page.index("<section id='glance'>") :]
    titles = [
        "At a glance",
        "Table 1: KN consistency",
        "Figures 3/7/8: CS per relation (IG)",
        "Figure 9:",
        "Table 2:",
        "Table 3:",
        "Figure 4:",
        "Figures 6/11:",
        "Figures 5/10:",
        "Table 6:",
        "Table 7:",
    ]
    positions = [body.index(t) for t in titles]
    assert positions == sorted(positions)
    panels = {
        chunk.split("<h3>", 1)[1].split("</h3>", 1)[0]: chunk
        for chunk in body.split("<div class='result'")[1:]
    }
    mapping = panels["Figure 4: query-KN mapping"]
    assert 'download="fig4_mapping.csv"' in mapping and "<img " in mapping  # the table with its figure
    # A narrow table sits beside its figure, a wide one (Figure 4's ten columns) above it.
    assert "panel pair" in panels["Figure 9: KI share as the threshold varies"] and "panel stack" in mapping
    assert "dProb" in mapping  # the caption says what is measured
    table2 = panels["Table 2: knowledge modification through Self and Union KN sets"]
    assert "WikiText-2 perplexity" in table2 and "facts per row" in table2
    cells = re.findall(r"<td[^>]*>(.*?)</td>", page)
    assert cells and not [c for c in cells if re.search(r"\d[eE][+-]?\d", c)]  # no scientific notation
    markdown = written["markdown"].read_text()
    assert "## At a glance" in markdown and "### Table 2: knowledge modification" in markdown
    assert "| method |" in markdown


def test_report_computes_table1_from_the_store_where_consistency_was_not_run(reproduced, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reproduced, run)
    for name in ("table1", "consistency", "fig9_ki_share", "relations_ig", "relations_amig", "relations_sig"):
        (run / "tables" / f"{name}.csv").unlink()
    (run / "tables" / "table1.md").unlink()
    for png in run.glob("figures/violin_*.png"):
        png.unlink()
    (run / "figures" / "fig9_threshold.png").unlink()
    section = read_section(run)
    assert section.tables["table1"].computed
    assert {"violin_ig", "violin_amig", "violin_sig"} <= set(section.figures)
    assert list((run / "tables").glob("table1.*")) == []  # nothing written into the run
    page = write_report([run], tmp_path / "report.html")["html"].read_text()
    assert "Computed by qloc report from the store" in page and "AMIG: KI share, static threshold" in page


def test_text_from_data_reaches_the_page_only_escaped(hostile_run, tmp_path):
    page = write_report([hostile_run], tmp_path / "report.html")["html"].read_text()
    assert "<script>alert(1)" not in page and "<!-- " not in page and "\u2028" not in page
    assert page.count("<script") == 2  # the explorer's data and its code, nothing else
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in page  # table8's prompt, as text
    data = re.search(
        r"<script type='application/json' id='qloc-explorer-data'>(.*?)</script>", page, re.S
    ).group(1)
    prompts = [q[0] for f in json.loads(data)["runs"][0]["facts"] for q in f["queries"]]
    assert HOSTILE in prompts


def test_report_refuses_a_directory_without_results(tmp_path):
    result = subprocess.run(QLOC + ["report", "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "no qloc tables" in result.stderr


def test_report_open_uses_the_browser_only_where_there_is_a_display(reproduced, tmp_path, monkeypatch):
    # $BROWSER names the browser webbrowser uses first: a script that notes the address it gets.
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f"#!{sys.executable}\nimport sys\nopen({str(opened)!r}, 'w').write(sys.argv[1])\n")
    browser.chmod(0o755)
    headless = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    command = QLOC + ["report", "--run-dir", str(reproduced), "--out", str(tmp_path / "r.html"), "--open"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=headless | {"DISPLAY": ":99", "BROWSER": str(browser)}
    )
    assert result.returncode == 0, result.stderr
    assert opened.read_text() == (tmp_path / "r.html").resolve().as_uri()
    if sys.platform.startswith("linux"):  # elsewhere a display is taken for granted
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        opened.unlink()
        assert not open_in_browser(tmp_path / "r.html") and not opened.exists()


def test_report_works_in_headless_chromium_figures_and_explorer(hostile_run, tmp_path):
    if BROWSER is None:
        message = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("QLOC_REQUIRE_BROWSER") == "1":
            pytest.fail(message + "; QLOC_REQUIRE_BROWSER=1 demands it")
        pytest.skip(message)
    page = write_report([hostile_run], tmp_path / "report.html")["html"]
    artifacts = _artifacts(tmp_path)
    with qloc.RunStore.open_existing(hostile_run) as store:
        kn_sets = store.frame("kn_sets")
    facts = list(dict.fromkeys(kn_sets.fact_id))
    queries = kn_sets.drop_duplicates(["fact_id", "query_index"]).groupby("fact_id").size()
    with HeadlessChromium(BROWSER, width=1400, height=1100) as browser:
        browser.open(page.resolve().as_uri())
        images = browser.evaluate("""Array.from(document.images).map(img => {
            const box = img.getBoundingClientRect(), style = getComputedStyle(img);
            return [img.complete && img.naturalWidth > 0, box.width > 0 && box.height > 0 &&
                    style.display !== 'none' && style.visibility !== 'hidden'];
        })""")
        assert len(images) == len(list((hostile_run / "figures").glob("*.png"))) > 5
        assert all(decoded and visible for decoded, visible in images), images
        browser.screenshot(artifacts / "report-top.png")
        for fact in facts:
            state = browser.evaluate(f"""(() => {{
                const list = document.querySelector('#qloc-explorer select[size]');
                const prefix = {json.dumps(fact + " ")};
                const option = Array.from(list.options).find(o => o.text.startsWith(prefix));
                list.value = option.value;
                list.dispatchEvent(new Event('change'));
                const root = document.getElementById('qloc-explorer');
                const canvas = root.querySelector('canvas[data-kind=overlap]');
                const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
                let inked = 0;
                for (let k = 0; k < pixels.length; k += 4) if (pixels[k] < 200) inked += 1;
                return [root.dataset.fact, Number(root.dataset.overlapCells), inked,
                        root.querySelectorAll('canvas[data-kind=strip]').length, root.innerText];
            }})()""")
            shown, cells, inked, strips, text = state
            assert shown == fact and cells == queries[fact] ** 2 and inked > 0 and strips == 1, state[:4]
            assert "Edits (AMIG KN sets)" in text and "Query-KN mapping" in text
        # The hostile prompt is shown as text, and never ran.
        browser.evaluate(
            "(() => { const list = document.querySelector('#qloc-explorer select[size]'); "
            "list.value = '0'; list.dispatchEvent(new Event('change')); })()"
        )
        assert HOSTILE.split("<!--")[0] in browser.evaluate(
            "document.getElementById('qloc-explorer').innerText"
        )
        # The search box narrows the list to one fact.
        count = browser.evaluate(f"""(() => {{
            const search = document.querySelector('#qloc-explorer input[type=search]');
            search.value = {json.dumps(facts[-1])};
            search.dispatchEvent(new Event('input'));
            return document.querySelector('#qloc-explorer select[size]').options.length; }})()""")
        assert count == 1
        browser.screenshot(artifacts / "report-explorer.png", "#explorer")
        dialogs = ("Runtime.exceptionThrown", "Page.javascriptDialogOpening")
        errors = [e for e in browser.events if e.get("method") in dialogs]
        assert not errors, errors[:3]
    summary = (
        f"browser test passed: {len(images)} figures decoded and visible; explorer switched through "
        f"{len(facts)} facts; screenshots {artifacts / 'report-top.png'} and "
        f"{artifacts / 'report-explorer.png'}\n"
    )
    (artifacts / "browser-test.txt").write_text(summary)
    print(summary)
