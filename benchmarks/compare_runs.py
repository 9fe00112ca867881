"""Compare two fedhash run folders number by number: a refactor must move none.

    python benchmarks/compare_runs.py RUN_A RUN_B

For ``fedhash simulate`` / ``demo`` folders (summary.json) it compares every row of the final table
and every number of every round of every mode (timings and model versions excepted); for
``fedhash train`` folders (metrics.json) every step's loss, every epoch, the mAP and the bit balance.
Exit status 0 when identical, 1 otherwise (the differences are listed).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

SKIP = ("seconds", "time", "client_seconds_max", "model_version", "created")


def walk(x, y, path: str, out: list[str]) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            if any(str(k).startswith(s) for s in SKIP):
                continue
            if k not in x or k not in y:
                out.append(f"{path}/{k}: only in {'B' if k not in x else 'A'}")
                continue
            walk(x[k], y[k], f"{path}/{k}", out)
    elif isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            out.append(f"{path}: {len(x)} entries against {len(y)}")
            return
        for i, (p, q) in enumerate(zip(x, y)):
            walk(p, q, f"{path}[{i}]", out)
    elif isinstance(x, float) and isinstance(y, float):
        if not (x == y or (math.isnan(x) and math.isnan(y))):
            out.append(f"{path}: {x!r} against {y!r}")
    elif x != y:
        out.append(f"{path}: {x!r} against {y!r}")


def records(run: Path) -> dict:
    if (run / "summary.json").is_file():
        s = json.loads((run / "summary.json").read_text())
        return {"final": s.get("final"), "rounds_by_mode": s.get("rounds_by_mode")}
    if (run / "metrics.json").is_file():
        m = json.loads((run / "metrics.json").read_text())
        return {k: m.get(k) for k in ("step_loss", "epochs", "symmetric", "asymmetric", "bit_balance")}
    sys.exit(f"{run}: neither summary.json (fedhash simulate) nor metrics.json (fedhash train)")


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = Path(sys.argv[1]), Path(sys.argv[2])
    out: list[str] = []
    walk(records(a), records(b), "", out)
    if out:
        print("\n".join(out[:50]) + (f"\n... and {len(out) - 50} more" if len(out) > 50 else ""))
        print(f"{len(out)} differences")
        return 1
    print(f"identical: {a.name} and {b.name} (every row of the final table and every number of every round)"
          if (a / "summary.json").is_file() else f"identical: {a.name} and {b.name} (every step, epoch and mAP)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
