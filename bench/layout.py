"""The code layout's cost, measured: CLI start-up, the serving image, and who imports whom.

Compares this working tree with a baseline commit checked out beside it (a temporary `git worktree`),
in the same run, interleaved, so the machine's noise hits both alike:

- `driftloop --help` wall time (median of --runs interleaved runs each), each tree on its own
  PYTHONPATH with the same virtual environment;
- the Bento `bentoml build` makes from each tree's bentofile.yaml: size of its source, file count,
  requirement count;
- lines per room, and the import graph between rooms (module-level and function-level imports).

    python bench/layout.py                       # against the commit before the restructure
    python bench/layout.py --baseline HEAD~3 --runs 21 --json
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("core", "finetune", "service", "monitoring", "loop", "driftloop")
DEFAULT_BASELINE = "46d47f4"  # main before issue 14 (one room per stage)


def help_seconds(tree: Path) -> float:
    """One `driftloop --help`, importing the CLI from `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "DRIFTLOOP_HOME": str(Path(tempfile.gettempdir()) / "driftloop-layout-bench")}
    code = "import sys; sys.argv = ['driftloop', '--help']; from driftloop.cli import main; main()"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - started


def bento(tree: Path) -> dict:
    """Build the Bento of `tree` into a throwaway BentoML home; its source size, files and requirements."""
    home = Path(tempfile.mkdtemp(prefix="bento-home-"))
    try:
        env = {**os.environ, "BENTOML_HOME": str(home), "PYTHONPATH": str(tree), "BENTOML_DO_NOT_TRACK": "True"}
        bentoml = Path(sys.executable).parent / "bentoml"
        subprocess.run([str(bentoml), "build", "-q", "."], cwd=tree, env=env, check=True, capture_output=True)
        src = next(home.glob("bentos/*/*/src"))
        files = [p for p in src.rglob("*") if p.is_file()]
        reqs = [line for line in (tree / "requirements-serve.txt").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        total = sum(p.stat().st_size for p in src.parent.rglob("*") if p.is_file())  # the Bento's directory
        return {"bento_bytes": total, "source_bytes": sum(p.stat().st_size for p in files), "files": len(files),
                "requirements": len(reqs), "rooms": sorted({p.relative_to(src).parts[0] for p in files if len(p.relative_to(src).parts) > 1})}
    finally:
        shutil.rmtree(home, ignore_errors=True)


def rooms(tree: Path) -> dict:
    """Lines per room and module, and the room-to-room import edges (module-level vs in a function)."""
    lines: dict[str, dict[str, int]] = {}
    edges: dict[str, dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    lazy_first_party = 0
    for room in ROOMS:
        for path in sorted((tree / room).glob("*.py")) if (tree / room).is_dir() else []:
            text = path.read_text(encoding="utf-8")
            lines.setdefault(room, {})[path.name] = text.count("\n")
            for node in ast.walk(ast.parse(text)):
                targets = []
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets = [node.module]
                elif isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                for target in targets:
                    top = target.split(".")[0]
                    if top in ROOMS:
                        lazy = node.col_offset > 0
                        lazy_first_party += lazy
                        if top != room:
                            edges[room][f"{top}{' (in a function)' if lazy else ''}"] += 1
    return {"lines": lines, "edges": {k: dict(v) for k, v in edges.items()}, "function_level_first_party_imports": lazy_first_party}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref to compare with")
    parser.add_argument("--runs", type=int, default=15, help="interleaved `--help` runs per tree")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="driftloop-baseline-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT, check=True, capture_output=True)
    try:
        trees = {"baseline": base, "current": ROOT}
        for tree in trees.values():  # warm the file cache and the bytecode once
            help_seconds(tree)
        times = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                times[name].append(help_seconds(tree))
        out = {name: {"help_s_median": round(statistics.median(t), 3), "help_s_min": round(min(t), 3),
                      **bento(tree), **rooms(tree)} for name, (tree, t) in ((n, (trees[n], times[n])) for n in trees)}
        out["baseline"]["ref"] = args.baseline
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False, capture_output=True)
        shutil.rmtree(base.parent, ignore_errors=True)

    if args.json:
        print(json.dumps(out, indent=2))
        return
    b, c = out["baseline"], out["current"]
    print(f"| | baseline ({args.baseline}) | current | ratio |")
    print("|---|---|---|---|")
    print(f"| `driftloop --help`, median of {args.runs} (s) | {b['help_s_median']} | {c['help_s_median']} | "
          f"{c['help_s_median'] / b['help_s_median']:.2f}x |")
    print(f"| Bento size (bytes) | {b['bento_bytes']:,} | {c['bento_bytes']:,} | {c['bento_bytes'] / b['bento_bytes']:.2f}x |")
    print(f"| Bento source: files, bytes | {b['files']}, {b['source_bytes']:,} | {c['files']}, {c['source_bytes']:,} | "
          f"{c['source_bytes'] / b['source_bytes']:.2f}x |")
    print(f"| Bento source rooms | {', '.join(b['rooms'])} | {', '.join(c['rooms'])} | |")
    print(f"| serving requirements | {b['requirements']} | {c['requirements']} | |")
    print(f"| function-level first-party imports | {b['function_level_first_party_imports']} | "
          f"{c['function_level_first_party_imports']} | |")
    for name in ("baseline", "current"):
        print(f"\n{name}: lines per room")
        for room, files in out[name]["lines"].items():
            print(f"  {room}/ {sum(files.values())} lines, {len(files)} files: "
                  + ", ".join(f"{f} {n}" for f, n in files.items()))
        print(f"{name}: imports between rooms (count of import statements)")
        for room, targets in sorted(out[name]["edges"].items()):
            print(f"  {room} -> " + ", ".join(f"{t} {n}" for t, n in sorted(targets.items())))


if __name__ == "__main__":
    main()
