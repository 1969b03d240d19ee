"""ParaRel facts with paraphrased cloze queries (METHODS.md section 1).

The full dataset ships inside the package (``qloc/data``, gzipped; see ``data/NOTICE.md`` for
origin and licenses). ``data_all_allbags.json`` maps relation -> list of bags, a bag (one fact)
being a list of ``[query, object, "P19(place of birth)"]`` rows; subjects come from
``query_pairs.json`` (same order), bundled too, or beside a user-given file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError, first_line

MASK = "[MASK]"
QueryFilter = Literal["mask_final", "mask_period"]
QUERY_FILTERS = ("mask_final", "mask_period")


@dataclass(frozen=True)
class Fact:
    id: str
    """``<relation>/<index of the bag in its relation>``, stable across runs."""
    relation: str
    relation_label: str
    subject: str | None
    object: str
    queries: tuple[str, ...]
    """Usable causal-LM prompts: the text before ``[MASK]``, right-stripped."""
    dropped_queries: int = 0
    """Paraphrases skipped because ``[MASK]`` does not end them."""

    @property
    def label(self) -> str:
        return f"fact {self.id} ({self.subject!r} -> {self.object!r})"

    @property
    def digest(self) -> str:
        """A hash of what the fact says (relation, subject, answer, queries): a run records it, so
        that a later stage notices a data file that now says something else under the same id."""
        content = [self.id, self.relation, self.relation_label, self.subject, self.object, list(self.queries)]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


@dataclass
class ParaRel:
    facts: list[Fact]
    skipped: Counter = field(default_factory=Counter)
    """Reason -> count of facts (or malformed rows) that were not turned into usable facts."""
    warnings: list[str] = field(default_factory=list)
    """One line per malformed row, naming it."""
    total_queries: int = 0
    file_relations: list[str] = field(default_factory=list)
    """Every relation in the file, also those left without a usable fact."""

    @property
    def relations(self) -> list[str]:
        return list(dict.fromkeys(f.relation for f in self.facts))


def causal_prompt(query: str, query_filter: QueryFilter = "mask_final") -> str | None:
    """The prompt a causal LM reads for a cloze query, or None where ``[MASK]`` does not end it.

    ``mask_final`` (default, METHODS.md): nothing but whitespace and a full stop may follow
    ``[MASK]``. ``mask_period``: the query must end with ``[MASK].`` or ``[MASK] .`` (the rule the
    dataset's SOURCE.md counts with; it drops patterns such as "[X], developed by [Y]").
    """
    index = query.find(MASK)
    if index < 0 or query.count(MASK) != 1:
        return None
    rest = query[index + len(MASK) :]
    if query_filter == "mask_period":
        if rest not in (".", " ."):
            return None
    elif rest.strip().rstrip(".").strip():
        return None
    prompt = query[:index].rstrip()
    return prompt or None


def _read_json(path: Path, what: str) -> Any:
    """The JSON in ``path`` (gzipped where it ends in .gz); an unreadable one (truncated, not JSON,
    not UTF-8) is one error naming it as ``what``."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f, object_pairs_hook=_refuse_duplicate_keys)
    except DuplicateKeyError as exc:
        raise DataError(
            f"{what} {str(path)!r} holds the key {exc.key!r} twice; JSON keeps only the last, so merge them"
        ) from None
    except (OSError, ValueError, EOFError) as exc:  # EOFError: a truncated .gz
        raise DataError(f"{what} {str(path)!r} is not readable JSON: {first_line(exc)}") from None


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (a relation's second block would
    silently replace its first)."""
    keys = Counter(key for key, _ in pairs)
    if twice := [key for key, count in keys.items() if count > 1]:
        raise DuplicateKeyError(twice[0])
    return dict(pairs)


def _read_subjects(path: Path) -> dict[str, list[str]]:
    """``query_pairs.json``: relation -> the subject of each fact, in the data file's order (each
    entry is ``[subject, object]``)."""
    pairs = _read_json(path, "query pairs file")
    if not isinstance(pairs, dict):
        raise DataError(
            f"query pairs file {str(path)!r}: expected an object mapping relation -> list of pairs"
        )
    subjects: dict[str, list[str]] = {}
    for relation, entries in pairs.items():
        if not isinstance(entries, list):
            raise DataError(f"query pairs file {str(path)!r}: relation {relation!r} is not a list of pairs")
        for index, entry in enumerate(entries):
            if not (isinstance(entry, list) and entry and isinstance(entry[0], str)):
                raise DataError(
                    f"query pairs file {str(path)!r}: entry {index} of relation {relation!r} is {entry!r}, "
                    "not a [subject, object] pair"
                )
        subjects[relation] = [entry[0] for entry in entries]
    return subjects


def bundled_path(name: str) -> Path:
    return Path(str(resources.files("qloc.data").joinpath(name)))


def _data_paths(path: str | Path | None) -> tuple[Path, Path | None]:
    """The ParaRel file to read (``path``, or the bundled copy) and the query-pairs file beside it
    that gives each fact's subject, where there is one."""
    pairs_path: Path | None
    if path is None:
        data_path, pairs_path = (
            bundled_path("pararel_allbags.json.gz"),
            bundled_path("pararel_query_pairs.json.gz"),
        )
    else:
        data_path = Path(path)
        if data_path.is_dir():
            raise DataError(
                f"ParaRel file {str(data_path)!r} is a folder; give a data_all_allbags.json(.gz) file"
            )
        if data_path.exists() and not data_path.is_file():
            raise DataError(f"ParaRel file {str(data_path)!r} is not a regular file")
        if not data_path.is_file():
            raise DataError(f"ParaRel file {str(data_path)!r} does not exist")
        pairs_path = next(
            (
                p
                for p in (data_path.parent / "query_pairs.json", data_path.parent / "query_pairs.json.gz")
                if p.is_file()
            ),
            None,
        )
    return data_path, pairs_path


def load_pararel(
    path: str | Path | None = None,
    min_queries: int = 2,
    query_filter: QueryFilter = "mask_final",
) -> ParaRel:
    """Load ParaRel facts, keeping those with at least ``min_queries`` usable causal-LM queries.

    ``path``: a ``data_all_allbags.json`` (optionally ``.gz``); default the bundled copy. Malformed
    rows and facts are named in ``warnings``, counted in ``skipped`` and left out; the rest loads.
    """
    data_path, pairs_path = _data_paths(path)
    raw = _read_json(data_path, "ParaRel file")
    if not isinstance(raw, dict):
        raise DataError(
            f"ParaRel file {str(data_path)!r}: expected an object mapping relation -> list of facts"
        )
    subjects_of = _read_subjects(pairs_path) if pairs_path else {}

    result = ParaRel(facts=[], file_relations=list(raw))
    for relation, bags in raw.items():
        if not isinstance(bags, list):
            result.warnings.append(f"{data_path.name}: relation {relation!r} is not a list of facts; skipped")
            result.skipped["malformed relation"] += 1
            continue
        subjects = subjects_of.get(relation, [])
        for index, bag in enumerate(bags):
            fact_id = f"{relation}/{index}"
            fact = _parse_bag(
                fact_id,
                relation,
                bag,
                subjects[index] if index < len(subjects) else None,
                result,
                query_filter,
            )
            if fact is None:
                continue
            if len(fact.queries) < min_queries:
                result.skipped[f"fewer than {min_queries} usable queries"] += 1
                continue
            result.facts.append(fact)
    return result


def _parse_bag(
    fact_id: str, relation: str, bag: Any, subject: str | None, result: ParaRel, query_filter: QueryFilter
) -> Fact | None:
    if not isinstance(bag, list) or not bag:
        result.warnings.append(
            f"fact {fact_id}: not a non-empty list of [query, answer, relation] rows; skipped"
        )
        result.skipped["malformed fact"] += 1
        return None
    prompts: list[str] = []
    objects, labels = set(), set()
    dropped = 0
    for row_index, row in enumerate(bag):
        if not (
            isinstance(row, list)
            and len(row) == 3
            and all(isinstance(x, str) for x in row)
            and row[1].strip()
        ):
            result.warnings.append(
                f"fact {fact_id} row {row_index}: expected [query, answer, relation] strings, got {row!r}; "
                "row skipped"
            )
            result.skipped["malformed row"] += 1
            continue
        query, obj, label = row
        result.total_queries += 1
        objects.add(obj)
        labels.add(label)
        prompt = causal_prompt(query, query_filter)
        if prompt is None:
            dropped += 1
        else:
            prompts.append(prompt)
    if len(objects) != 1:
        if objects:
            result.warnings.append(
                f"fact {fact_id}: rows disagree on the answer ({sorted(objects)}); skipped"
            )
        result.skipped["malformed fact"] += 1
        return None
    label = sorted(labels)[0]
    return Fact(
        id=fact_id,
        relation=relation,
        relation_label=label,
        subject=subject,
        object=objects.pop(),
        queries=tuple(prompts),
        dropped_queries=dropped,
    )


def sample_facts(
    facts: list[Fact],
    relations: list[str] | None = None,
    facts_per_relation: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Fact]:
    """Seeded sample, returned in dataset order: filter by relation, then at most
    ``facts_per_relation`` per relation, then at most ``limit`` in all."""
    for name, count in (("facts_per_relation", facts_per_relation), ("limit", limit)):
        if count is not None and count < 0:
            raise DataError(f"{name} {count}: a number of facts cannot be negative")
    if relations:
        known = {f.relation for f in facts}
        unknown = [r for r in relations if r not in known]
        if unknown:
            known_list = ", ".join(sorted(known)) or "none"
            raise DataError(f"unknown relation(s) {', '.join(unknown)}; known: {known_list}")
        wanted = set(relations)
        facts = [f for f in facts if f.relation in wanted]
    rng = random.Random(seed)
    if facts_per_relation is not None:
        by_relation: dict[str, list[int]] = {}
        for i, fact in enumerate(facts):
            by_relation.setdefault(fact.relation, []).append(i)
        keep = set()
        for indices in by_relation.values():
            keep.update(rng.sample(indices, min(facts_per_relation, len(indices))))
        facts = [f for i, f in enumerate(facts) if i in keep]
    if limit is not None and limit < len(facts):
        keep = set(rng.sample(range(len(facts)), limit))
        facts = [f for i, f in enumerate(facts) if i in keep]
    return facts


def interleave_relations(facts: list[Fact]) -> list[Fact]:
    """The facts in round-robin order over their relations (each relation's facts keep their order),
    so that a sweep stopped part-way has covered every relation about equally."""
    by_relation: dict[str, list[Fact]] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    queues = [by_relation[r] for r in relation_order(by_relation)]
    depth = max((len(q) for q in queues), default=0)
    return [q[i] for i in range(depth) for q in queues if i < len(q)]


def relation_order(relations: Iterable[str]) -> list[str]:
    """Relations in numeric order of their Wikidata id (P17 before P101)."""
    return sorted(set(relations), key=lambda r: (int(r[1:]) if r[1:].isdigit() else 10**9, r))
