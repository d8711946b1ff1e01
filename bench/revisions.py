"""Two revisions of the engine timed side by side: is a change slower than the code before it?

    python -m bench.revisions --base f8a2450 --rounds 7          # the working tree against commit f8a2450
    python -m bench.revisions --base main --head HEAD --json

The base (and a head other than the working tree) is checked out into a temporary git worktree.
Each round runs `genclip bench engine --json` once per revision, each in a fresh process, in
alternating order (base first in even rounds, head first in odd ones), so slow drift on a shared
machine hits both alike. Per batch size, the ratio head/base of images/s is taken within each round
and reported as the median with its min and max over rounds. Nothing is asserted: a ratio within the
spread of the rounds is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Point:
    """One engine figure: which backbone, size and batch it was measured at, and images per second."""

    backbone: str
    image_size: int
    batch: int
    images_per_s: float

    @property
    def key(self) -> str:
        return f"{self.backbone} {self.image_size} px batch {self.batch}"


def cli_module(tree: Path) -> str:
    """The module that runs `genclip` in a tree: `cli` since the CLI package exists, `agent.cli` before."""
    return "cli" if (tree / "cli" / "__main__.py").is_file() else "agent.cli"


@contextmanager
def checkout(rev: str | None) -> Iterator[Path]:
    """The tree of `rev` (a temporary worktree, removed afterwards), or the working tree for None."""
    if rev is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="genclip-rev-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), rev], check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def run_once(tree: Path, bench_args: list[str]) -> list[Point]:
    """One `genclip bench engine --json` in a fresh process on `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", cli_module(tree), "bench", "engine", "--json", "--no-naive", *bench_args]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"bench engine failed in {tree} (exit {done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout)
    return [
        Point(p["backbone"], p["image_size"], e["batch"], e["images_per_s"])
        for p in report["points"]
        for e in p["engine"]
    ]


def compare(rounds: list[tuple[list[Point], list[Point]]]) -> dict[str, dict[str, float]]:
    """Per point: median images/s of each revision and the head/base ratio (median, min, max over rounds)."""
    table: dict[str, dict[str, float]] = {}
    for key in [p.key for p in rounds[0][0]]:
        base = [next(p.images_per_s for p in b if p.key == key) for b, _ in rounds]
        head = [next(p.images_per_s for p in h if p.key == key) for _, h in rounds]
        ratios = [h / b for b, h in zip(base, head, strict=True)]
        table[key] = {
            "base_images_per_s": round(statistics.median(base), 2),
            "head_images_per_s": round(statistics.median(head), 2),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3),
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--head", default=None, help="git revision to time (default: the working tree)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("bench_args", nargs="*", help="passed to `genclip bench engine` (after --)")
    args = parser.parse_args(argv)
    bench_args = args.bench_args or ["--backbone", "genclip-tiny", "--rounds", "3", "--threads", "1"]
    results: list[tuple[list[Point], list[Point]]] = []
    with checkout(args.base) as base_tree, checkout(args.head) as head_tree:
        for r in range(args.rounds):
            order = [("base", base_tree), ("head", head_tree)]
            got = {name: run_once(tree, bench_args) for name, tree in (order if r % 2 == 0 else order[::-1])}
            results.append((got["base"], got["head"]))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    table = compare(results)
    head_name = args.head or "working tree"
    if args.json:
        print(json.dumps({"base": args.base, "head": head_name, "rounds": args.rounds, "points": table}, indent=2))
        return 0
    print(f"head ({head_name}) vs base ({args.base}), {args.rounds} alternating rounds, images/s")
    for key, row in table.items():
        print(
            f"  {key:<32} base {row['base_images_per_s']:>8.2f}  head {row['head_images_per_s']:>8.2f}  "
            f"ratio {row['ratio_median']:.3f} (min {row['ratio_min']:.3f}, max {row['ratio_max']:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
