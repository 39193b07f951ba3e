"""The long image-fuzzing campaign: forged fields, random bytes, semantic forgeries (loops,
overlaps, out-of-range pointers) and truncations over every fuzz preset, each damaged image
mounted in-process and walked with every oracle of bench/fuzzing/.

    .venv/bin/python -m bench.fuzz --minutes 30                 # rounds until time is up
    .venv/bin/python -m bench.fuzz --minutes 5 --presets ext4,ext2-1k --all-fields
    .venv/bin/python -m bench.fuzz --match dir_size_huge --rounds 1

Each round draws new random cases (seed = --seed + round). Failing cases are written, one
small JSON file each (pristine preset + patches), to --save (default bench/out/fuzz-found/);
move the ones worth keeping to tests/robust/corpus/ (see docs/robustness.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.fuzzing.cases import generate_cases
from bench.fuzzing.corpus import save_case
from bench.fuzzing.images import FUZZ_PRESETS, ImageStore
from bench.fuzzing.oracle import run_case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget (default 10)")
    ap.add_argument("--rounds", type=int, default=0, help="stop after N rounds (0: time only)")
    ap.add_argument("--presets", default=",".join(FUZZ_PRESETS))
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--all-fields", action="store_true",
                    help="every forged value of every field (else 6 drawn per structure)")
    ap.add_argument("--flips", type=int, default=6, help="random-byte cases per structure")
    ap.add_argument("--match", default="", help="only cases whose name contains this")
    ap.add_argument("--trace-memory", action="store_true",
                    help="tracemalloc peak per case (about 10x slower)")
    ap.add_argument("--save", type=Path, default=Path("bench/out/fuzz-found"))
    ap.add_argument("--json", type=Path, help="write the summary here")
    args = ap.parse_args(argv)

    deadline = time.monotonic() + args.minutes * 60
    presets = [p for p in args.presets.split(",") if p]
    store = ImageStore()
    verdicts: Counter[str] = Counter()
    per_structure: Counter[str] = Counter()
    failures: list[str] = []
    worst_step = 0.0
    worst_rss = 0.0
    n = 0
    try:
        with tempfile.TemporaryDirectory(prefix="asyncfs-fuzz-run-") as wd:
            rnd = 0
            while time.monotonic() < deadline and (not args.rounds or rnd < args.rounds):
                rng = random.Random(args.seed + rnd)
                for preset in presets:
                    img = store.image(preset)
                    lay = store.layout(img)
                    cases = generate_cases(preset, img, lay, rng,
                                           fields_per_region=0 if args.all_fields else 6,
                                           flips_per_region=args.flips)
                    if args.match:
                        cases = [c for c in cases if args.match in c.name]
                    for case in cases:
                        if time.monotonic() >= deadline:
                            break
                        out = run_case(store, case, Path(wd), trace_memory=args.trace_memory)
                        n += 1
                        verdicts[out.verdict] += 1
                        per_structure[case.structure] += 1
                        worst_step = max(worst_step, out.longest_step)
                        worst_rss = max(worst_rss, out.peak_mib)
                        if out.failed:
                            path = save_case(args.save, case, out)
                            line = f"{out.verdict:9} {case.name}: {out.detail[:300]}"
                            failures.append(line)
                            print(line.replace("\n", " | "), f"-> {path}", flush=True)
                print(f"round {rnd}: {n} cases, {dict(verdicts)}", flush=True)
                rnd += 1
    finally:
        store.close()
    summary = {"cases": n, "verdicts": dict(verdicts), "per_structure": dict(per_structure),
               "failures": len(failures), "longest_step_s": round(worst_step, 3),
               "max_rss_rise_mib": round(worst_rss, 1)}
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
