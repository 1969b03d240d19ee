"""First-order attribution batched over queries, against IG, on the same queries in one process.

    .venv/bin/python benchmarks/gxa_batch.py [--model smollm2-135m] [--facts 6] [--batch-sizes 8,32,64]
        [--equal-length 64 --ig-sample 8]

The queries are every query of ``--facts`` ParaRel facts (one per relation, seed 0). Prints seconds
per query of IG (20 steps, one query at a time), of gxa one query at a time (``qloc.attribute``), of
gxa batched within each fact (what ``qloc localize --methods gxa`` does) and of gxa batched over all
the queries at each batch size (``qloc.attribute_many``), each with its speed-up over IG (issue 24
asks for 20x), the sizes of the equal-length groups a batch can draw from, and the largest
difference of any batched query's scores from its one-query scores.

A few facts' queries fall into small equal-length groups, which caps the batch. ``--equal-length
N`` adds what a sweep over many facts would batch: N ParaRel queries (of facts beyond the first)
whose prompts all have the most common token length, gxa per query at each batch size, against IG
per query on the first ``--ig-sample`` of those same N queries (IG on all of them would take
minutes per batch size). Notes: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import collections
import time
import warnings

import torch

import qloc
from qloc.engine.attribution import DEFAULT_STEPS
from qloc.engine.tokens import encode_query


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--facts", type=int, default=6)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--method", default="gxa", help="gxa or gxa-amig")
    parser.add_argument("--batch-sizes", default="8,32,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--equal-length", type=int, default=0)
    parser.add_argument("--ig-sample", type=int, default=8)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    lm = qloc.load_model(args.model, device="cpu", dtype="float32")
    facts = qloc.sample_facts(qloc.load_pararel().facts, facts_per_relation=1, seed=0)[: args.facts]
    queries = [(prompt, fact.object) for fact in facts for prompt in fact.queries]
    lengths = collections.Counter(len(encode_query(lm, p, a).prompt_ids) for p, a in queries)
    print(
        f"model {args.model}, cpu float32, {torch.get_num_threads()} threads, {len(facts)} facts, "
        f"{len(queries)} queries; equal-length groups (tokens: queries) {dict(sorted(lengths.items()))}"
    )
    prompts, answers = zip(*queries)
    # Warm up (allocator, thread pools, first-call dispatch) before timing.
    qloc.attribute(lm, prompts[0], answers[0], "ig", steps=2)
    qloc.attribute_many(lm, prompts[:4], answers[:4], args.method)

    started = time.perf_counter()
    for prompt, answer in queries:
        qloc.attribute(lm, prompt, answer, "ig", steps=args.steps)
    ig = (time.perf_counter() - started) / len(queries)

    started = time.perf_counter()
    alone = [qloc.attribute(lm, prompt, answer, args.method) for prompt, answer in queries]
    rows = [(f"{args.method}, one query at a time", (time.perf_counter() - started) / len(queries))]

    started = time.perf_counter()
    for fact in facts:
        qloc.attribute_many(lm, fact.queries, [fact.object] * len(fact.queries), args.method)
    rows.append((f"{args.method}, batched within each fact", (time.perf_counter() - started) / len(queries)))

    worst_difference, same_kn_sets = 0.0, True
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        started = time.perf_counter()
        batched = qloc.attribute_many(lm, prompts, answers, args.method, batch_size=batch_size)
        seconds = (time.perf_counter() - started) / len(queries)
        rows.append((f"{args.method}, batched over all, batch size {batch_size}", seconds))
        for one, many in zip(alone, batched):
            difference = float((many.scores - one.scores).abs().max() / one.scores.abs().max())
            worst_difference = max(worst_difference, difference)
            same_kn_sets &= many.kn_set() == one.kn_set()

    print(f"{'attribution':<46} {'s/query':>8} {'IG / it':>8}")
    print(f"{f'ig, {args.steps} steps, one query at a time':<46} {ig:>8.3f} {'1.0x':>8}")
    for label, seconds in rows:
        print(f"{label:<46} {seconds:>8.3f} {f'{ig / seconds:.1f}x':>8}")
    print(
        f"batched against one query at a time: max |diff| / max score {worst_difference:.1e}, "
        f"same KN sets {same_kn_sets}"
    )
    if args.equal_length:
        equal_length_section(lm, args)


def equal_length_section(lm: qloc.LoadedModel, args: argparse.Namespace) -> None:
    """gxa per query on N queries of one prompt length at each batch size, against IG on a sample."""
    facts = qloc.sample_facts(qloc.load_pararel().facts, facts_per_relation=8, seed=0)
    queries = [(prompt, fact.object) for fact in facts for prompt in fact.queries]
    length_of = {query: len(encode_query(lm, *query).prompt_ids) for query in queries}
    common, _ = collections.Counter(length_of.values()).most_common(1)[0]
    chosen = [query for query in queries if length_of[query] == common][: args.equal_length]
    prompts, answers = zip(*chosen)
    sample = chosen[: args.ig_sample]
    started = time.perf_counter()
    for prompt, answer in sample:
        qloc.attribute(lm, prompt, answer, "ig", steps=args.steps)
    ig = (time.perf_counter() - started) / len(sample)
    print(f"{len(chosen)} queries of {common} prompt tokens; IG {ig:.3f} s/query on the first {len(sample)}")
    print(f"{'batch size':>10} {'s/query':>8} {'IG / it':>8}")
    for batch_size in [1] + [int(b) for b in args.batch_sizes.split(",")]:
        started = time.perf_counter()
        qloc.attribute_many(lm, prompts, answers, args.method, batch_size=batch_size)
        seconds = (time.perf_counter() - started) / len(chosen)
        print(f"{batch_size:>10} {seconds:>8.3f} {f'{ig / seconds:.1f}x':>8}")


if __name__ == "__main__":
    main()
