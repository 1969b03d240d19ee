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
from qloc.errors import QlocError
from qloc.report import open_in_browser, read_section, unit_counts, write_report
from qloc.report_explorer import explorer_run
from qloc.report_findings import Evidence, load_paper_reference, model_findings, reference_model
from qloc.report_format import format_number, format_share, script_json

from headless_browser import HeadlessChromium, find_browser

QLOC = [sys.executable, "-m", "qloc.cli"]
BROWSER = find_browser()
HOSTILE = "</script><script>alert(1)</script><!-- \u2028"
"""Text that would end the data's <script> element, run code or open a comment if not escaped."""


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, tiny_model_dir):
    run = tmp_path_factory.mktemp("reproduce") / "run"
    command = ["reproduce", "--model", str(tiny_model_dir), "--facts", "3", "--run-dir", str(run),
               "--known", "1000", "--device", "cpu", "--quiet"]
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


def test_reproduce_runs_every_stage(reproduced):
    with qloc.RunStore.open_existing(reproduced) as store:
        stages = {s["stage"]: s["params"] for s in store.stages()}
        units = store.units()
    assert set(stages) == {"census", "localize", "edit-erase-amig", "edit-update-amig", "sequential-update-amig",
                           "mapping-amig", "synapses-amig"}
    assert stages["localize"]["methods"] == ["ig", "amig", "sig"] and stages["localize"]["steps"] == 20
    assert (units.status == "done").all()
    for table in ("table1", "table2", "table3", "table7", "fig4_mapping", "fig6_synapses", "table6_cost"):
        assert (reproduced / "tables" / f"{table}.csv").exists(), table
    for figure in ("fig4_mapping", "fig5_heatmap", "fig6_synapses", "fig9_threshold",
                   "fig11_dkn_distributions", "violin_sig"):
        assert (reproduced / "figures" / f"{figure}.png").exists(), figure
    assert (reproduced / "report.html").exists() and (reproduced / "report.md").exists()


def test_rerun_resumes_without_recomputing(reproduced, tiny_model_dir):
    with qloc.RunStore.open_existing(reproduced) as store:
        before = store.units()
    command = QLOC + ["reproduce", "--model", str(tiny_model_dir), "--facts", "3", "--run-dir",
                      str(reproduced), "--known", "1000", "--device", "cpu", "--quiet"]
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
    for claim in ("Table 1 (R_KI", "Table 1 (Welch", "Table 2 (Gen of Self and Union", "Table 2 (dPPL)",
                  "Table 3 (Avg of CAS", "Figure 4 (dProb", "Figure 6 (dKN"):
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
    titles = ["At a glance", "Table 1: KN consistency", "Figures 3/7/8: CS per relation (IG)", "Figure 9:",
              "Table 2:", "Table 3:", "Figure 4:", "Figures 6/11:", "Figures 5/10:", "Table 6:", "Table 7:"]
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
    assert list((run / "tables").glob("table1*")) == []  # nothing written into the run
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


def test_script_json_round_trips_and_cannot_close_its_element():
    value = {"prompt": HOSTILE, "nested": [HOSTILE, "a & b > c"]}
    text = script_json(value)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == value


@pytest.mark.parametrize("value, text", [
    (0.60349, "0.603"), (373.68366, "373.68"), (1050.219, "1,050"), (846517.8, "846,518"),
    (1.2322966e52, "1.2×10^52"), (1.9e-11, "1.9×10^-11"), (-0.0108, "-0.011"), (31.0, "31"), (20, "20"),
    (9.96e9, "1×10^10"), (float("nan"), "–"), (0.0, "0"), ("KC", "KC"),
])
def test_numbers_are_written_plainly_unless_extreme(value, text):
    assert format_number(value) == text


def test_format_share_gives_the_count():
    assert format_share(4 / 31, 31) == "12.9 % (4 of 31)" and format_share(float("nan")) == "–"


def test_unit_counts_group_skip_reasons():
    units = pd.DataFrame({"stage": ["a", "a", "a", "b"], "status": ["done", "skipped", "skipped", "done"],
                          "reason": [None, "answer not tokenizable: fact 1", "answer not tokenizable: fact 2",
                                     None],
                          "seconds": [1.0, None, None, 2.0]})
    counts = unit_counts(units).set_index("stage")
    assert counts.loc["a", "done"] == 1 and counts.loc["a", "skipped"] == 2
    assert counts.loc["a", "skip reasons"] == "2 answer not tokenizable"
    assert counts.loc["b", "skip reasons"] == "-"


def test_report_refuses_a_directory_without_results(tmp_path):
    result = subprocess.run(QLOC + ["report", "--run-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "no qloc tables" in result.stderr


# -- findings rules, on tables written by hand --------------------------------------------------


def _table1(ig_ki: float = 0.5, **extra) -> pd.DataFrame:
    rows = []
    for method, r_ki in (("ig", ig_ki), ("amig", 0.0)):
        for kind in ("static", "otsu"):
            rows.append(dict(model="m-135m", method=method, threshold=kind, threshold_value=0.1, facts=10,
                             R_KI=r_ki, R_KC=1 - r_ki, CS_KI=0.05, CS_KC=0.4, t=5.0 if r_ki else float("nan"),
                             p=0.001 if r_ki else float("nan"), U_KI=0.0, empty_union=0, **extra))
    return pd.DataFrame(rows)


def _findings(evidence: Evidence, reference=None):
    result = model_findings(evidence, reference or load_paper_reference())
    return result, {f.measure: f for f in result.findings}


def test_table1_findings_mark_the_direction_and_use_the_chance_baseline_when_present():
    result, found = _findings(Evidence("m-135m", tables={"table1": _table1()}))
    assert found["IG: KI share, static threshold 0.100"].verdict == "agrees"  # inside the quoted 44-84 %
    assert found["AMIG: KI share, static threshold 0.100"].verdict == "differs"
    _, few = _findings(Evidence("m-135m", tables={"table1": _table1(ig_ki=0.05)}))
    below = few["IG: KI share, static threshold 0.100"]
    assert (below.verdict, below.note) == ("differs", "below the paper's range")  # KI facts exist, but few
    assert found["IG: Welch's t (KC vs KI), static threshold"].verdict == "agrees"
    assert found["AMIG: Welch's t (KC vs KI), static threshold"].verdict == "open"
    assert found["facts whose CS beats chance"].measured == "not computed"
    assert any(w.startswith("AMIG (10 facts): every fact is KC") for w in result.warnings)

    with_null = _table1(cs_null_mean=0.38, cs_null_p95=0.45, R_above_null=0.2, degenerate=False)
    with_null.loc[with_null.method == "amig", "degenerate"] = True
    result, found = _findings(Evidence("m-135m", tables={"table1": with_null}))
    beats = found["IG: facts whose CS beats chance (95th percentile of the null, 0.450)"]
    assert beats.measured == "20.0 % (2 of 10)" and "0.380" in beats.note
    assert found["AMIG: KI share, static threshold 0.100"].verdict == "open"
    assert any("AMIG is flagged degenerate" in w for w in result.warnings)
    assert any("IG: the mean CS of KC facts (0.400) is not above chance" in w for w in result.warnings)


def test_edit_findings_compare_self_union_and_cas_and_flag_broken_edits():
    rows = []
    for kind, gens in (("KC", {"self": 0.8, "union": 0.82, "cas": 0.85}),
                       ("KI", {"self": 0.2, "union": 0.6, "cas": 0.7})):
        for kn_set, gen in gens.items():
            rows.append(dict(method="amig", mode="erase", kn_set=kn_set, **{"class": kind}, rel=0.9, gen=gen,
                             loc=0.9, avg=(0.9 + gen + 0.9) / 3, dppl=5.0,
                             dppl_median=2.5 if kn_set == "union" else 0.1, facts=10,
                             catastrophic=0.6 if kn_set == "union" else 0.0, moved_right=0.8))
    table3 = pd.DataFrame(rows)
    table2 = table3[table3.kn_set != "cas"]
    result, found = _findings(Evidence("m-135m", tables={"table2": table2, "table3": table3}))
    assert found["AMIG erase, KI facts: Gen through Self vs Union"].verdict == "agrees"
    assert found["AMIG erase, KC facts: Gen through Self vs Union"].verdict == "agrees"  # smaller gap than KI
    assert found["AMIG erase, KI facts: Avg of CAS vs Self / Union"].verdict == "agrees"
    union = found["AMIG erase: median dPPL through Union"]
    assert union.verdict == "broken"
    assert union.note == "60.0 % (12 of 20) of edits above 1; 80.0 % moved P(answer) the intended way"
    assert found["AMIG erase: median dPPL through Self"].verdict == "open"
    assert any("multiplies WikiText perplexity (Union x3.500)" in w for w in result.warnings)

    flipped = table2.assign(gen=lambda t: t.gen.where(t["class"] != "KI", 0.9))
    _, found = _findings(Evidence("m-135m", tables={"table2": flipped}))
    assert found["AMIG erase, KI facts: Gen through Self vs Union"].verdict == "differs"


def test_mapping_and_synapse_findings_read_the_order_and_the_signs():
    effect = {"self": -0.9, "union": -0.95, "intersection": -0.3, "refine": -0.5, "unrelated": 0.01}
    mapping = pd.DataFrame([dict(method="amig", operation="suppress", kn_set=s, **{"class": "KI"}, dprob=v,
                                 queries=5) for s, v in effect.items()])
    synapses = pd.DataFrame([dict(method="amig", operation=op, **{"class": "Avg"}, queries=5,
                                  synapses_mean=3.0, dkn_kn_mean=sign * 0.2, dkn_kn_median=sign * 0.1,
                                  dprob_mean=sign * 0.3,
                                  dprob_median=-0.2) for op, sign in (("suppress", -1), ("enhance", 1))])
    _, found = _findings(Evidence("m-135m", tables={"fig4_mapping": mapping, "fig6_synapses": synapses}))
    order = found["AMIG suppress, KI: mean dProb per KN set, strongest first"]
    assert order.verdict == "agrees" and order.measured.startswith("Union -0.950; Self -0.900")
    assert found["AMIG suppress KS, 5 queries: median dKN of mean activation, dProb"].verdict == "agrees"
    enhance = found["AMIG enhance KS, 5 queries: median dKN of mean activation, dProb"]
    assert enhance.verdict == "differs" and "P(answer) falls" in enhance.note

    mapping.loc[mapping.kn_set == "intersection", "dprob"] = -0.99
    _, found = _findings(Evidence("m-135m", tables={"fig4_mapping": mapping}))
    assert "Self does not beat" in found["AMIG suppress, KI: mean dProb per KN set, strongest first"].note


def test_unknown_facts_and_empty_kn_sets_are_said_in_words():
    kn_sets = pd.DataFrame({"fact_id": ["a", "a", "b", "b", "c", "c"], "query_index": [0, 1] * 3,
                            "method": "ig", "rank": [0, 50, 400, 30, 99, 12], "kn_size": [3, 0, 4, 5, 0, 2]})
    result, _ = _findings(Evidence("m-135m", kn_sets=kn_sets))
    assert any("1 of 3 facts (33.3 %) are known" in line for line in result.context)
    assert any("Most facts are unknown to the model: 2 of 3" in w for w in result.warnings)
    assert any(w.startswith("Only 3 facts: one fact moves every share by 33.3 %") for w in result.warnings)
    assert any("IG: 2 of 6 queries have an empty KN set" in w for w in result.warnings)


def test_the_closest_paper_model_and_its_values(tmp_path):
    paper = load_paper_reference()
    assert reference_model("smollm2-135m", 1536, paper)[0] == "GPT-2"
    assert reference_model("Meta-Llama-3-8B", None, paper)[0] == "LLaMA3-8b"
    assert reference_model("local-model", 14336, paper)[0] == "LLaMA3-8b"
    data = json.loads((Path(qloc.__file__).parent / "data" / "paper_reference.json").read_text())
    data["claims"]["ki_share"]["values"]["GPT-2"]["ig static"] = 0.25
    data["claims"]["welch"]["values"]["GPT-2"]["ig static t"] = 3.5
    custom = tmp_path / "reference.json"
    custom.write_text(json.dumps(data))
    welch = {"t = ": "ig static t", "p = ": "ig static p"}
    assert load_paper_reference(custom).values_text("welch", "GPT-2", welch, ", ") == (
        f"t = {format_number(3.5)}, p = not transcribed"
    )
    assert paper.values_text("welch", "GPT-2", welch, ", ") == "not transcribed"
    _, found = _findings(Evidence("m-135m", tables={"table1": _table1()}), load_paper_reference(custom))
    assert found["IG: KI share, static threshold 0.100"].paper == "25.0 %"
    assert found["IG: KI share, otsu threshold 0.100"].paper == "not transcribed"
    custom.write_text("{}")
    with pytest.raises(QlocError, match="reference.json"):
        load_paper_reference(custom)


def test_explorer_data_is_compact_and_carries_the_columns_a_store_has():
    kn = ["[[0, 1], [2, 3]]", "[[2, 3]]", "[[1, 0]]", "[[1, 0], [2, 3]]"]
    kn_sets = pd.DataFrame({"fact_id": ["f1", "f1", "f2", "f2"], "relation": "P1", "method": "ig",
                            "query_index": [0, 1, 0, 1], "prompt": ["a", "b", "c", "d"],
                            "answer": ["x", "x", "y", "y"], "kn": kn, "prob": [0.5, 0.25, 0.1, 0.1],
                            "rank": [0, 3, 20, 40]})
    edits = pd.DataFrame({"fact_id": ["f1"], "method": "ig", "mode": "erase", "kn_set": "self", "kn_size": 2,
                          "new_object": [None], "rel": 1.0, "gen": 0.5, "loc": 0.9, "avg": 0.8, "dppl": 2.0,
                          "prob_before": 0.5, "prob_after": 0.01})
    run = explorer_run("run", "m", {"kn_sets": kn_sets, "edits": edits}, (3, 8))
    first, second = run["facts"]
    assert first["kn"]["ig"] == [[1, 19], [19]]  # layer * 8 + neuron, sorted
    assert first["queries"] == [["a", 0.5, 0], ["b", 0.25, 3]] and first["cs"]["ig"]["cs"] == 0.5
    assert first["edits"]["rows"][0]["prob_after"] == 0.01 and "edits" not in second
    assert explorer_run("run", "m", {"kn_sets": kn_sets}, None)["width"] == 4  # largest neuron + 1


# -- --open, and the page in a real browser ------------------------------------------------------


def test_report_open_uses_the_browser_only_where_there_is_a_display(reproduced, tmp_path, monkeypatch):
    # $BROWSER names the browser webbrowser uses first: a script that notes the address it gets.
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "fake-browser"
    browser.write_text(f"#!{sys.executable}\nimport sys\nopen({str(opened)!r}, 'w').write(sys.argv[1])\n")
    browser.chmod(0o755)
    headless = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    command = QLOC + ["report", "--run-dir", str(reproduced), "--out", str(tmp_path / "r.html"), "--open"]
    result = subprocess.run(command, capture_output=True, text=True,
                            env=headless | {"DISPLAY": ":99", "BROWSER": str(browser)})
    assert result.returncode == 0, result.stderr
    assert opened.read_text() == (tmp_path / "r.html").resolve().as_uri()
    if sys.platform.startswith("linux"):  # elsewhere a display is taken for granted
        monkeypatch.delenv("DISPLAY", raising=False)
        monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
        opened.unlink()
        assert not open_in_browser(tmp_path / "r.html") and not opened.exists()


def _artifacts(tmp_path: Path) -> Path:
    """Where the browser test leaves its screenshots: $QLOC_ARTIFACTS (CI prints it), else tmp."""
    return Path(os.environ.get("QLOC_ARTIFACTS") or tmp_path)


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
                const prefix = {json.dumps(fact + ' ')};
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
        browser.evaluate("(() => { const list = document.querySelector('#qloc-explorer select[size]'); "
                         "list.value = '0'; list.dispatchEvent(new Event('change')); })()")
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


def test_paper_ranges_stand_in_for_cells_that_were_not_transcribed():
    from qloc.report_findings import load_paper_reference

    paper = load_paper_reference()
    assert paper.value("ki_share", "GPT-2", "amig static") is None
    assert paper.value_text("ki_share", "GPT-2", "amig static", share=True).startswith("44")
    assert "0.14" in paper.value_text("ki_share", "GPT-2", "amig static CS_KC")  # the most specific range wins
    assert paper.value_text("ki_share", "GPT-2", "amig otsu") == "not transcribed"
    assert "0.18" in paper.value_text("dppl", "LLaMA3-8b", "erase KI self")
    assert paper.value_text("dppl", "LLaMA3-8b", "erase KI union") == "not transcribed"
