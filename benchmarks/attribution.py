"""Attribution speed: the plain per-layer reference loop against qloc's engine, side by side.

    .venv/bin/python benchmarks/attribution.py [--model smollm2-135m] [--queries 3] [--steps 20]

Prints seconds per query of the reference and of the engine for IG, AMIG, SIG and the first-order
gxa and gxa-amig on the same ParaRel queries, the speed-up ratios, AMIG/IG and SIG/IG time ratios,
and the largest score difference. The reference is qloc.testing (the METHODS.md
definition; for gxa and gxa-amig, IG's and AMIG's at one step). Then each first-order method
beside the path method whose baseline it takes: how much faster, and how far its KN sets are.
Notes of measured figures: benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import qloc
from qloc.engine.attribution import DEFAULT_STEPS, METHODS, FirstOrder, attribute, kn_set
from qloc.engine.tokens import encode_query
from qloc.testing import reference_scores


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--methods", default="ig,amig,sig,gxa,gxa-amig")
    parser.add_argument(
        "--reference-methods",
        default="ig,amig,sig,gxa,gxa-amig",
        help="methods also timed with the reference loop",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    lm = qloc.load_model(args.model, device=args.device, dtype=args.dtype)
    facts = qloc.sample_facts(qloc.load_pararel().facts, facts_per_relation=1, seed=0)
    queries = [("The Eiffel Tower is located in the city of", "Paris")] + [
        (f.queries[0], f.object) for f in facts
    ]
    queries = queries[: args.queries]
    tokens = [len(encode_query(lm, p, a).prompt_ids) for p, a in queries]
    print(
        f"model {args.model} ({lm.num_layers} layers, d_ff {lm.d_ff}), {args.device} {args.dtype}, "
        f"{torch.get_num_threads()} threads, steps {args.steps}, {len(queries)} queries, "
        f"prompt tokens {tokens}"
    )

    # Warm both paths up (allocator, thread pools, first-call dispatch) before timing.
    attribute(lm, queries[0][0], queries[0][1], "ig", steps=2)
    reference_scores(lm, queries[0][0], queries[0][1], "ig", steps=2)

    engine_time: dict[str, float] = {}
    engine_scores: dict[str, list[torch.Tensor]] = {}
    print(
        f"{'method':<6} {'reference s/query':>18} {'engine s/query':>15} {'speed-up':>9} "
        f"{'max |diff| / max':>17} {'same KN set':>12}"
    )
    for method in args.methods.split(","):
        engine_runs = [
            timed(lambda p=p, a=a, method=method: attribute(lm, p, a, method, steps=args.steps))
            for p, a in queries
        ]
        engine_time[method] = statistics.mean(t for _, t in engine_runs)
        engine_scores[method] = [e.scores for e, _ in engine_runs]
        path_method, steps = path_method_of(method), 1 if method in FIRST_ORDER else args.steps
        if method in args.reference_methods.split(","):
            ref_runs = [
                timed(lambda p=p, a=a, m=path_method, s=steps: reference_scores(lm, p, a, m, steps=s))
                for p, a in queries
            ]
            ref_time = statistics.mean(t for _, t in ref_runs)
            diff = max(
                float((e.scores - r).abs().max() / r.abs().max())
                for (e, _), (r, _) in zip(engine_runs, ref_runs)
            )
            same = all(e.kn_set() == kn_set(r) for (e, _), (r, _) in zip(engine_runs, ref_runs))
            print(
                f"{method:<6} {ref_time:>18.2f} {engine_time[method]:>15.2f} "
                f"{ref_time / engine_time[method]:>8.1f}x {diff:>17.1e} {str(same):>12}"
            )
        else:
            print(f"{method:<6} {'-':>18} {engine_time[method]:>15.2f}")
    if "ig" in engine_time:
        for method in ("amig", "sig"):
            if method in engine_time:
                print(
                    f"{method}/ig time ratio {engine_time[method] / engine_time['ig']:.2f} "
                    f"(mean prompt tokens {statistics.mean(tokens):.1f})"
                )
    first_order = [m for m in engine_time if m in FIRST_ORDER and path_method_of(m) in engine_time]
    if first_order:
        print(
            f"{'method':<9} {'beside':<6} {'speed-up':>9} {'mean KN Jaccard':>16} "
            f"{'same KN set':>12} {'reference KNs found':>20}"
        )
    for method in first_order:
        path = path_method_of(method)
        pairs = list(zip(engine_scores[method], engine_scores[path]))
        jaccard = statistics.mean(overlap(kn_set(cheap), kn_set(full))[0] for cheap, full in pairs)
        recall = statistics.mean(overlap(kn_set(cheap), kn_set(full))[1] for cheap, full in pairs)
        same = sum(kn_set(cheap) == kn_set(full) for cheap, full in pairs)
        print(
            f"{method:<9} {path:<6} {engine_time[path] / engine_time[method]:>8.1f}x "
            f"{jaccard:>16.2f} {f'{same}/{len(pairs)}':>12} {recall:>20.2f}"
        )


FIRST_ORDER = {name: method.path_method for name, method in METHODS.items() if issubclass(method, FirstOrder)}


def path_method_of(method: str) -> str:
    """The path method whose baseline a first-order method takes (gxa: ig), or the method itself."""
    return FIRST_ORDER.get(method, method)


def overlap(cheap: list, full: list) -> tuple[float, float]:
    """Jaccard of two KN sets, and the share of ``full``'s neurons in ``cheap`` (1 where both are empty)."""
    a, b = set(cheap), set(full)
    union = a | b
    return (len(a & b) / len(union) if union else 1.0, len(a & b) / len(b) if b else 1.0)


if __name__ == "__main__":
    main()
