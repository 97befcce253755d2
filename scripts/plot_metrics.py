"""Loss curve (and learning rate) PNG from one or more training `metrics.jsonl` logs.

    python scripts/plot_metrics.py runs/tiny/metrics.jsonl [more.jsonl ...] --out loss.png

A resumed run appends to its log, so a step may appear twice: the last entry wins. Each log is one
curve, labelled by its directory name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_log(path: Path) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise ValueError(f"{path}:{i + 1}: not a metrics line (JSON with a step)") from None
    if not rows:
        raise ValueError(f"{path}: no metrics")
    return dict(sorted(rows.items()))


def plot(logs: list[Path], out: Path, smooth: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                    gridspec_kw={"height_ratios": [3, 1]})
    for path in logs:
        rows = read_log(path)
        steps = list(rows)
        loss = [rows[s]["loss"] for s in steps]
        if smooth > 1:  # trailing moving average
            windows = [loss[max(0, i - smooth + 1): i + 1] for i in range(len(loss))]
            loss = [sum(w) / len(w) for w in windows]
        label = path.parent.name or str(path)
        ax.plot(steps, loss, label=label)
        ax_lr.plot(steps, [rows[s].get("lr", float("nan")) for s in steps], label=label)
    ax.set_ylabel("training loss" + (f" (mean of {smooth})" if smooth > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)  # never leave a half-written PNG behind


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="metrics.jsonl files")
    p.add_argument("--out", type=Path, default=Path("loss.png"))
    p.add_argument("--smooth", type=int, default=1, help="moving-average window (steps)")
    args = p.parse_args(argv)
    try:
        for path in args.logs:
            if not path.is_file():
                raise ValueError(f"{path}: no such file")
        plot(args.logs, args.out, args.smooth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
