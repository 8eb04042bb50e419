"""
What the bubblewrap sandbox costs per call: HumanEval's 164 problems graded on their reference
solutions (HumanEval.evaluate, the path chat_eval takes) in the bubblewrap sandbox and in the
basic one, taking turns problem by problem so that a drifting CPU speed hits both alike.
Prints seconds per call for each, the added milliseconds and the ratio against basic (the
baseline: how every call ran before bubblewrap), and how many passed (must be 164 in both).

    python -m bench.sandbox                # all 164, 2 rounds
    python -m bench.sandbox --rounds 1 --problems 40
"""

import argparse
import statistics
import sys
import time

from nanochat import execution
from tasks.humaneval import HumanEval


def main():
    parser = argparse.ArgumentParser(description="per-call cost of the bubblewrap sandbox against the basic one")
    parser.add_argument("--problems", type=int, default=164, help="the first N HumanEval problems")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the problems (medians are reported)")
    args = parser.parse_args()
    problem = execution._bubblewrap_problem()
    if problem:
        sys.exit(f"bench.sandbox: {problem}: nothing to compare")

    task = HumanEval()
    examples = [task.get_example(i) for i in range(min(args.problems, task.num_examples()))]
    seconds = {"basic": [], "bubblewrap": []}
    passed = {"basic": 0, "bubblewrap": 0}
    for _ in range(args.rounds):
        for example in examples:
            reference = example["messages"][-1]["content"]
            for kind in ("basic", "bubblewrap"):
                execution._sandbox_kind = kind
                t0 = time.perf_counter()
                passed[kind] += task.evaluate(example, reference)
                seconds[kind].append(time.perf_counter() - t0)

    calls = len(examples) * args.rounds
    base = statistics.median(seconds["basic"])
    print(f"HumanEval reference solutions, {len(examples)} problems x {args.rounds} rounds, alternating")
    print("| sandbox | median s/call | mean s/call | total s | passed | added ms/call | ratio |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("basic", "bubblewrap"):
        median = statistics.median(seconds[kind])
        print(f"| {kind} | {median:.4f} | {statistics.mean(seconds[kind]):.4f} | {sum(seconds[kind]):.1f} | "
              f"{passed[kind]}/{calls} | {1000 * (median - base):+.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
