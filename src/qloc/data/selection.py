"""Choosing the facts a run works on: a ParaRel file, its query filter and a seeded sample."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, QlocError
from ..settings import setting
from .pararel import QUERY_FILTERS, Fact, ParaRel, load_pararel, sample_facts

BUNDLED_SOURCE = "the bundled ParaRel"
MAX_WARNINGS = 20
"""Malformed rows named one by one; the rest are counted."""
log = logging.getLogger("qloc")


@dataclass(frozen=True)
class Selection:
    """Which facts: the data file, the query filter, and the seeded sample."""

    data: Path | None = setting(
        None, "A data_all_allbags.json(.gz) file; default: the ParaRel copy shipped with qloc."
    )
    relations: str | None = setting(None, "Comma-separated relation ids, e.g. P19,P36.")
    facts_per_relation: int | None = setting(None, "Seeded sample of at most N facts per relation.")
    limit: int | None = setting(None, "Seeded sample of at most N facts in all (after --facts-per-relation).")
    seed: int = setting(0)
    query_filter: str = setting(
        "mask_final",
        "mask_final: [MASK] ends the query (METHODS.md); mask_period: the query ends with '[MASK].'.",
    )

    def params(self) -> dict[str, Any]:
        """The selection as a run stores it among its parameters."""
        return {
            "data": str(self.data) if self.data else "bundled",
            "relations": self.relations,
            "facts_per_relation": self.facts_per_relation,
            "limit": self.limit,
            "seed": self.seed,
            "query_filter": self.query_filter,
        }

    @property
    def source(self) -> str:
        """Where the facts come from, for messages and for a run to record: the data file's absolute
        path (a relative --data means another file from another directory), or the bundled copy."""
        return str(self.data.resolve()) if self.data else BUNDLED_SOURCE

    @property
    def relation_list(self) -> list[str] | None:
        return [r.strip() for r in self.relations.split(",") if r.strip()] if self.relations else None

    def select(self, announce: bool = True) -> tuple[ParaRel, list[Fact]]:
        """The dataset and the sampled facts. Malformed rows are logged as warnings, and (with
        ``announce``) how many facts were selected; a selection of 0 facts is refused, naming why."""
        if self.relations is not None and not self.relation_list:
            raise ConfigError.invalid("relations", self.relations, "names no relation; leave it out for all")
        if self.query_filter not in QUERY_FILTERS:
            raise ConfigError.invalid("query_filter", self.query_filter, "choose mask_final or mask_period")
        dataset = load_pararel(self.data, query_filter=self.query_filter)  # type: ignore[arg-type]
        for warning in dataset.warnings[:MAX_WARNINGS]:
            log.warning("%s", warning)
        if len(dataset.warnings) > MAX_WARNINGS:
            log.warning("... and %d more malformed rows", len(dataset.warnings) - MAX_WARNINGS)
        source = f"ParaRel file {str(self.data)!r}" if self.data else "the bundled ParaRel"
        usable = set(dataset.relations)
        chosen = self.relation_list or []
        if unusable := [r for r in chosen if r in dataset.file_relations and r not in usable]:
            malformed = [
                w for w in dataset.warnings if any(f"fact {r}/" in w or repr(r) in w for r in unusable)
            ]
            raise QlocError(
                f"relation(s) {', '.join(unusable)} of {source} have no usable fact: "
                + (
                    f"{len(malformed)} malformed rows or facts (in the warnings above), and "
                    if malformed
                    else ""
                )
                + f"no fact with 2 or more queries that pass --query-filter {self.query_filter} "
                "([MASK] must end each query)"
            )
        facts = sample_facts(
            dataset.facts, self.relation_list, self.facts_per_relation, self.limit, self.seed
        )
        skipped = ", ".join(f"{n} {reason}" for reason, n in dataset.skipped.items()) or "none"
        if not facts:
            raise self._nothing_selected(source, skipped)
        if announce:
            log.info("%d facts selected of %d usable (skipped: %s)", len(facts), len(dataset.facts), skipped)
        return dataset, facts

    def _nothing_selected(self, source: str, skipped: str) -> ConfigError:
        if self.facts_per_relation == 0:
            return ConfigError(
                lambda name: f"0 facts selected: {name('facts_per_relation')} 0; nothing to do"
            )
        if self.limit == 0:
            return ConfigError(lambda name: f"0 facts selected: {name('limit')} 0; nothing to do")
        return ConfigError(
            lambda _: f"0 facts selected: {source} has no usable fact (skipped: {skipped}); nothing to do"
        )
