"""``python -m flux_engine.data [--test-size F] [--seed S] TASK...``: extracts BIG-bench tasks into the cache
(downloading the archive the first time) and prints record counts per task, subtask and split."""

from __future__ import annotations

import argparse
import collections

from flux_engine.data import BIGBENCH, cache_root, load_tasks, train_test_split


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_engine.data", description=__doc__)
    parser.add_argument("tasks", nargs="+", help="task names, e.g. social_iqa or goal_step_wikihow/step_inference")
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = load_tasks(args.tasks)
    train, test = train_test_split(records, test_size=args.test_size, seed=args.seed)
    print(f"archive {BIGBENCH.filename} sha256 {BIGBENCH.sha256}, cache {cache_root()}")
    counts = collections.Counter()
    for split, recs in (("train", train), ("test", test)):
        for r in recs:
            kind = "mc" if r.is_multiple_choice else "gen"
            counts[(r.domain, "*", kind, split)] += 1
            if r.subtask:
                counts[(r.domain, r.subtask, kind, split)] += 1
    print(f"{'domain':<28} {'subtask':<24} {'kind':<4} {'total':>7} {'train':>7} {'test':>7}")
    for domain, subtask, kind in sorted({k[:3] for k in counts}):
        tr, te = counts[(domain, subtask, kind, "train")], counts[(domain, subtask, kind, "test")]
        print(f"{domain:<28} {subtask:<24} {kind:<4} {tr + te:>7} {tr:>7} {te:>7}")
    print(f"{'all':<28} {'*':<24} {'':<4} {len(records):>7} {len(train):>7} {len(test):>7}")


if __name__ == "__main__":
    main()
