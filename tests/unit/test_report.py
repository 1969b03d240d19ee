"""`qloc reproduce` on a tiny model runs every stage, and `qloc report` makes one self-contained
HTML file: findings beside the paper first, every table beside its figure, a per-fact explorer that
a headless browser drives fact by fact, and text from the data escaped everywhere."""

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

import qloc
from qloc.errors import QlocError
from qloc.numbers import format_number, format_share
from qloc.report import render
from qloc.report.explorer import explorer_run
from qloc.report.findings import model_findings, reference_model
from qloc.report.format import script_json
from qloc.report.sections import unit_counts
from qloc.studies.claims import Evidence
from qloc.studies.paper import load_paper_reference
from tests.helpers import HOSTILE


def _table1(ig_ki: float = 0.5, **extra) -> pd.DataFrame:
    rows = []
    for method, r_ki in (("ig", ig_ki), ("amig", 0.0)):
        for kind in ("static", "otsu"):
            rows.append(
                dict(
                    model="m-135m",
                    method=method,
                    threshold=kind,
                    threshold_value=0.1,
                    facts=10,
                    R_KI=r_ki,
                    R_KC=1 - r_ki,
                    CS_KI=0.05,
                    CS_KC=0.4,
                    t=5.0 if r_ki else float("nan"),
                    p=0.001 if r_ki else float("nan"),
                    U_KI=0.0,
                    empty_union=0,
                    **extra,
                )
            )
    return pd.DataFrame(rows)


def _findings(evidence: Evidence, reference=None):
    result = model_findings(evidence, reference or load_paper_reference())
    return result, {f.measure: f for f in result.findings}


def test_script_json_round_trips_and_cannot_close_its_element():
    value = {"prompt": HOSTILE, "nested": [HOSTILE, "a & b > c"]}
    text = script_json(value)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == value


def test_the_page_templates_escape_every_value_as_the_report_does():
    """Autoescape with the report's own escape: quotes, U+2028 and markup from the data as character
    references; only the code's own numbers keep their tags."""
    page = render.environment().from_string("<p title='{{ text }}'>{{ text }}</p>{{ value|number }}")
    html = page.render(text=HOSTILE + "'\"&", value=1.2e52)
    assert "<script" not in html and "<!--" not in html and "\u2028" not in html
    assert "&lt;/script&gt;" in html and "&#8232;" in html and "&#x27;&quot;&amp;" in html
    assert html.endswith("1.2×10<sup>52</sup>")
    assert set(render.environment().list_templates()) >= {"report.html.j2", "tables.html.j2"}


def test_an_asset_that_could_end_its_element_is_refused(tmp_path, monkeypatch):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "x.js").write_text("let s = '</SCRIPT>';")
    monkeypatch.setattr(render, "resources", SimpleNamespace(files=lambda package: tmp_path))
    with pytest.raises(QlocError, match="closing"):
        render.asset("x.js")


@pytest.mark.parametrize(
    "value, text",
    [
        (0.60349, "0.603"),
        (373.68366, "373.68"),
        (1050.219, "1,050"),
        (846517.8, "846,518"),
        (1.2322966e52, "1.2×10^52"),
        (1.9e-11, "1.9×10^-11"),
        (-0.0108, "-0.011"),
        (31.0, "31"),
        (20, "20"),
        (9.96e9, "1×10^10"),
        (float("nan"), "–"),
        (0.0, "0"),
        ("KC", "KC"),
    ],
)
def test_numbers_are_written_plainly_unless_extreme(value, text):
    assert format_number(value) == text


def test_format_share_gives_the_count():
    assert format_share(4 / 31, 31) == "12.9 % (4 of 31)" and format_share(float("nan")) == "–"


def test_unit_counts_group_skip_reasons():
    units = pd.DataFrame(
        {
            "stage": ["a", "a", "a", "b"],
            "status": ["done", "skipped", "skipped", "done"],
            "reason": [None, "answer not tokenizable: fact 1", "answer not tokenizable: fact 2", None],
            "seconds": [1.0, None, None, 2.0],
        }
    )
    counts = unit_counts(units).set_index("stage")
    assert counts.loc["a", "done"] == 1 and counts.loc["a", "skipped"] == 2
    assert counts.loc["a", "skip reasons"] == "2 answer not tokenizable"
    assert counts.loc["b", "skip reasons"] == "-"


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
    assert found["AMIG: Welch's t (KC vs KI), otsu threshold"].note == "method degenerate here"
    assert any("AMIG is flagged degenerate" in w for w in result.warnings)
    assert any("IG: the mean CS of KC facts (0.400) is not above chance" in w for w in result.warnings)


def test_edit_findings_compare_self_union_and_cas_and_flag_broken_edits():
    rows = []
    for kind, gens in (
        ("KC", {"self": 0.8, "union": 0.82, "cas": 0.85}),
        ("KI", {"self": 0.2, "union": 0.6, "cas": 0.7}),
    ):
        for kn_set, gen in gens.items():
            rows.append(
                dict(
                    method="amig",
                    mode="erase",
                    kn_set=kn_set,
                    **{"class": kind},
                    rel=0.9,
                    gen=gen,
                    loc=0.9,
                    avg=(0.9 + gen + 0.9) / 3,
                    dppl=5.0,
                    dppl_median=2.5 if kn_set == "union" else 0.1,
                    facts=10,
                    catastrophic=0.6 if kn_set == "union" else 0.0,
                    moved_right=0.8,
                )
            )
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
    mapping = pd.DataFrame(
        [
            dict(method="amig", operation="suppress", kn_set=s, **{"class": "KI"}, dprob=v, queries=5)
            for s, v in effect.items()
        ]
    )
    synapses = pd.DataFrame(
        [
            dict(
                method="amig",
                operation=op,
                **{"class": "Avg"},
                queries=5,
                synapses_mean=3.0,
                dkn_kn_mean=sign * 0.2,
                dkn_kn_median=sign * 0.1,
                dprob_mean=sign * 0.3,
                dprob_median=-0.2,
            )
            for op, sign in (("suppress", -1), ("enhance", 1))
        ]
    )
    _, found = _findings(Evidence("m-135m", tables={"fig4_mapping": mapping, "fig6_synapses": synapses}))
    # Figures 4 and 6 print no numbers: qloc's direction is said in words, with no verdict.
    order = found["AMIG suppress, KI: mean dProb per KN set, strongest first"]
    assert order.verdict == "open" and order.measured.startswith("Union -0.950; Self -0.900")
    assert (
        order.note.startswith("no call (no paper number)")
        and order.paper.startswith("Figure 4 is a bar chart")
        and "as the paper describes it" in order.note
    )
    suppress = found["AMIG suppress KS, 5 queries: median dKN of mean activation, dProb"]
    assert suppress.verdict == "open" and "as the paper describes it" in suppress.note
    enhance = found["AMIG enhance KS, 5 queries: median dKN of mean activation, dProb"]
    assert enhance.verdict == "open" and "not as the paper describes it" in enhance.note
    assert "P(answer) falls" in enhance.note

    mapping.loc[mapping.kn_set == "intersection", "dprob"] = -0.99
    _, found = _findings(Evidence("m-135m", tables={"fig4_mapping": mapping}))
    assert "Self does not beat" in found["AMIG suppress, KI: mean dProb per KN set, strongest first"].note


def test_unknown_facts_and_empty_kn_sets_are_said_in_words():
    kn_sets = pd.DataFrame(
        {
            "fact_id": ["a", "a", "b", "b", "c", "c"],
            "query_index": [0, 1] * 3,
            "method": "ig",
            "rank": [0, 50, 400, 30, 99, 12],
            "kn_size": [3, 0, 4, 5, 0, 2],
        }
    )
    result, _ = _findings(Evidence("m-135m", kn_sets=kn_sets))
    assert any("1 of 3 facts (33.3 %) are known" in line for line in result.context)
    assert any("Most facts are unknown to the model: 2 of 3" in w for w in result.warnings)
    assert any(w.startswith("Only 3 facts: one fact moves every share by 33.3 %") for w in result.warnings)
    assert any("IG: 2 of 6 queries have an empty KN set" in w for w in result.warnings)


def test_the_closest_paper_model_and_its_cells(tmp_path):
    paper = load_paper_reference()
    assert reference_model("smollm2-135m", 1536, paper)[0] == "GPT-2"
    assert reference_model("Meta-Llama-3-8B", None, paper)[0] == "LLaMA3-8b"
    assert reference_model("local-model", 14336, paper)[0] == "LLaMA3-8b"
    _, found = _findings(Evidence("m-135m", tables={"table1": _table1()}))
    ki = found["IG: KI share, static threshold 0.100"]
    assert ki.paper == "44.0 % (paper's 3 cells over its models: 44.0 %-84.0 %)" and ki.verdict == "agrees"
    assert found["IG: mean CS of KC facts, static threshold"].verdict == "differs"  # 0.4 against 0.16-0.21
    assert found["IG: Otsu's threshold (the paper's Table 4)"].paper.startswith("0.146")
    data = json.loads((Path(qloc.__file__).parent / "data" / "paper_reference.json").read_text())
    data["tables"]["table1"]["rows"] = [
        r for r in data["tables"]["table1"]["rows"] if r["threshold"] != "otsu"
    ]
    custom = tmp_path / "reference.json"
    custom.write_text(json.dumps(data))
    _, found = _findings(Evidence("m-135m", tables={"table1": _table1()}), load_paper_reference(custom))
    otsu = found["IG: KI share, otsu threshold 0.100"]
    assert otsu.paper == "no cell in the paper's Table 1 for GPT-2" and otsu.verdict == "open"
    custom.write_text("{}")
    with pytest.raises(QlocError, match="reference.json"):
        load_paper_reference(custom)


def test_explorer_data_is_compact_and_carries_the_columns_a_store_has():
    kn = [[[0, 1], [2, 3]], [[2, 3]], [[1, 0]], [[1, 0], [2, 3]]]
    kn_sets = pd.DataFrame(
        {
            "fact_id": ["f1", "f1", "f2", "f2"],
            "relation": "P1",
            "method": "ig",
            "query_index": [0, 1, 0, 1],
            "prompt": ["a", "b", "c", "d"],
            "answer": ["x", "x", "y", "y"],
            "kn": kn,
            "prob": [0.5, 0.25, 0.1, 0.1],
            "rank": [0, 3, 20, 40],
        }
    )
    edits = pd.DataFrame(
        {
            "fact_id": ["f1"],
            "method": "ig",
            "mode": "erase",
            "kn_set": "self",
            "kn_size": 2,
            "new_object": [None],
            "rel": 1.0,
            "gen": 0.5,
            "loc": 0.9,
            "avg": 0.8,
            "dppl": 2.0,
            "prob_before": 0.5,
            "prob_after": 0.01,
        }
    )
    run = explorer_run("run", "m", {"kn_sets": kn_sets, "edits": edits}, (3, 8))
    first, second = run["facts"]
    assert first["kn"]["ig"] == [[1, 19], [19]]  # layer * 8 + neuron, sorted
    assert first["queries"] == [["a", 0.5, 0], ["b", 0.25, 3]] and first["cs"]["ig"]["cs"] == 0.5
    assert first["edits"]["rows"][0]["prob_after"] == 0.01 and "edits" not in second
    assert explorer_run("run", "m", {"kn_sets": kn_sets}, None)["width"] == 4  # largest neuron + 1


def test_the_paper_reference_holds_every_cell_of_its_tables():
    paper = load_paper_reference()
    sizes = {name: len(paper.rows(name)) for name in paper.tables}
    assert sizes == {
        "table1": 18,  # 3 models x 2 thresholds x 3 methods
        "table1_u_ki": 6,
        "table2": 24,  # 2 modes x 2 sets x 2 classes x 3 models
        "table3": 36,
        "table4": 18,
        "table6": 9,
        "table7": 2,
    }
    table1 = paper.rows("table1")
    assert ((table1.R_KC + table1.R_KI - 1).abs() <= 0.011).all()  # the reconstructed labels add up
    assert (
        paper.cell("table1", "t", "LLaMA3-8b", method="amig", threshold="static") == 123
    )  # quoted in the text
    assert paper.cell("table1_u_ki", "U_KI", "LLaMA3-8b", threshold="static") == 0.77
    # Avg = mean(Rel, Gen, Loc) everywhere but the cells the transcription lists as the paper's own slips.
    for name in ("table2", "table3"):
        edits = paper.rows(name)
        off = edits[((edits[["rel", "gen", "loc"]].mean(axis=1) - edits.avg).abs() > 0.011)]
        listed = " ".join(paper.tables[name]["notes"] + paper.tables["table2"]["notes"])
        for row in off.itertuples():
            assert f"{row.model}: printed Avg {row.avg:.2f}" in listed, row


def test_ranges_over_the_paper_models_come_from_its_cells():
    paper = load_paper_reference()
    static = paper.rows("table1").query("threshold == 'static'")
    assert (static.CS_KC.min(), static.CS_KC.max()) == (0.16, 0.25)  # not 0.14-0.30
    assert (static.R_KI.min(), static.R_KI.max()) == (0.44, 0.85)
    self_erase = paper.rows("table2").query("mode == 'erase' and kn_set == 'self'")
    assert (self_erase.dppl.min(), self_erase.dppl.max()) == (0.01, 0.06)  # not 0.01-0.18
    quote = paper.quote("table2", "dppl", "GPT-2", mode="erase", kn_set="self", **{"class": "KI"})
    assert quote.values == (0.06,) and (quote.low, quote.high) == (0.03, 0.06)


def test_no_verdict_stands_beside_a_missing_paper_number(tmp_path):
    """Every rule goes through the same gate: a paper without cells gives only "no call"."""
    data = json.loads((Path(qloc.__file__).parent / "data" / "paper_reference.json").read_text())
    for table in data["tables"].values():
        table["rows"] = []
    custom = tmp_path / "empty.json"
    custom.write_text(json.dumps(data))
    table3 = pd.DataFrame(
        [
            dict(
                method="amig",
                mode="erase",
                kn_set=s,
                **{"class": k},
                rel=0.9,
                gen=g,
                loc=0.9,
                avg=0.8,
                facts=5,
            )
            for k in ("KC", "KI")
            for s, g in (("self", 0.2), ("union", 0.6), ("cas", 0.9))
        ]
    )
    tables = {"table1": _table1(), "table2": table3[table3.kn_set != "cas"], "table3": table3}
    for paper in (load_paper_reference(custom), load_paper_reference()):
        result = model_findings(Evidence("m-135m", tables=tables), paper)
        for finding in result.findings:
            if finding.verdict in ("agrees", "differs"):
                assert paper is not None and not finding.paper.startswith("no cell"), finding
    result = model_findings(Evidence("m-135m", tables=tables), load_paper_reference(custom))
    assert result.findings and {f.verdict for f in result.findings} == {"open"}
    assert all(
        f.note.startswith("no call (no paper number)")
        for f in result.findings
        if "Welch" in f.measure and f.measured != "–"
    )


def test_the_report_names_the_cs_count_rule_nearest_the_paper():
    ablation = pd.DataFrame(
        [
            dict(group="g", setting=name, method="ig", R_KI_static=r, CS_KC_static=kc, CS_KI_static=ki)
            for name, r, kc, ki in (
                ("relaxed (>= 2 queries)", 0.1, 0.5, 0.08),
                ("all queries (strict)", 0.5, 0.25, 0.03),
            )
        ]
    )
    _, found = _findings(Evidence("m-135m", tables={"table1": _table1(), "cs_ablation": ablation}))
    variant = found["IG: R_KI / CS_KC / CS_KI (static) under each CS count rule"]
    assert variant.paper.startswith("0.440 / 0.210 / 0.030") and variant.verdict == "open"
    assert variant.note.startswith("nearest the paper's cells: all queries (strict)")


def test_table2_contrast_needs_self_to_reach_far_less_than_union_for_ki_facts():
    """Union's Gen above Self's is not the paper's claim: for KI facts Self's Gen must be under
    half of Union's (the paper's: 10-24 %), while KC facts keep most of it; 0.97 against 1.0 is no
    contrast, whatever the order."""

    def table2(ki_self: float) -> pd.DataFrame:
        gens = {("KC", "self"): 0.9, ("KC", "union"): 1.0, ("KI", "self"): ki_self, ("KI", "union"): 1.0}
        return pd.DataFrame(
            [
                dict(method="ig", mode="erase", kn_set=s, **{"class": k}, gen=g, gen_moved=g, facts=20)
                for (k, s), g in gens.items()
            ]
        )

    for ki_self, verdict in ((0.97, "differs"), (0.2, "agrees")):
        _, found = _findings(Evidence("m-135m", tables={"table1": _table1(), "table2": table2(ki_self)}))
        ki = found["IG erase, KI facts: Gen through Self vs Union"]
        kc = found["IG erase, KC facts: Gen through Self vs Union"]
        assert ki.verdict == kc.verdict == verdict, (ki, kc)
        assert "paraphrases moved: Self" in ki.note
