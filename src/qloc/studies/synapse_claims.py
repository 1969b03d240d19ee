"""What the synapse study shows: the captions of Figures 5/6/10/11 and Table 6, and its claim rule
(suppressing and enhancing a query's knowledge synapses moves its KNs and its answer the same way)."""

from __future__ import annotations

from ..engine.attribution import DEFAULT_SYNAPSE_THRESHOLD
from ..numbers import format_number
from .claims import ClaimRules, sign_word
from .paper import no_paper_number
from .registry import Caption, Frames, Panel, count_text


def _synapse_effects(t: Frames, panel: Panel) -> str:
    name = panel.tables[0]
    frame = t[name]
    measure = "mean |activation|" if name.endswith("magnitude") else "mean activation"
    return (
        "Suppressing (x0) or enhancing (x2) each query's knowledge synapses (attention probabilities "
        f"with an IG score >= {DEFAULT_SYNAPSE_THRESHOLD:g} x the top one; "
        f"{format_number(frame['synapses_mean'].max())} per query on average): relative change of the "
        f"{measure} of the query's KNs, of neighbour queries' KNs, of random non-KNs, and of P(answer); "
        f"{count_text(frame, 'queries')} queries. Means of ratios explode "
        "where a mean is near 0: read the medians. Figure 11 shows their distributions."
    )


CAPTIONS: dict[str, Caption] = {
    "fig6_synapses": _synapse_effects,
    "fig6_synapses_magnitude": _synapse_effects,
    "fig5_heatmap": (
        "KN activations of one fact (columns: its KNs by layer; rows: its queries) with no manipulation, "
        "with the query's knowledge synapses suppressed, and enhanced. The fact explorer below draws this "
        "for every fact the synapse experiment ran on."
    ),
    "table6_cost": (
        "Wall time (s) and peak memory (MB; CPU: growth of resident memory, CUDA: allocated memory) of "
        "one forward pass with no, suppressed and enhanced synapses; {passes} passes."
    ),
}
"""The synapse study's captions, by panel key (:data:`qloc.studies.registry.Caption`)."""


class SynapseClaims(ClaimRules):
    """The synapse study's claim (Figure 6)."""

    def check(self) -> None:
        self.synapses()

    def synapses(self) -> None:
        for name, measure_name in (
            ("fig6_synapses", "dKN of mean activation"),
            ("fig6_synapses_magnitude", "dKN of mean |activation|"),
        ):
            table = self.table(name)
            if table is None:
                continue
            suffix = "_abs" if name.endswith("magnitude") else ""
            for row in table[table["class"] == "Avg"].itertuples(index=False):
                values = row._asdict()
                statistic = "median" if f"dkn_kn{suffix}_median" in values else "mean"
                dkn = values[f"dkn_kn{suffix}_{statistic}"]
                dprob = values.get(f"dprob_{statistic}", values.get("dprob_mean"))
                direction = -1 if row.operation == "suppress" else 1
                right = [direction * dkn > 0, direction * dprob > 0]
                paper = no_paper_number(self.paper.unquoted("synapses"))
                note = (
                    ""
                    if all(right)
                    else (f"query's KN activation {sign_word(dkn)}, P(answer) {sign_word(dprob)}")
                )
                self.add(
                    "synapses",
                    f"{row.method.upper()} {row.operation} KS, {row.queries} queries: "
                    f"{statistic} {measure_name}, dProb",
                    f"dKN {format_number(dkn)}, dProb {format_number(dprob)}",
                    paper,
                    "agrees" if all(right) else "differs",
                    note,
                )
