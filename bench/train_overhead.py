"""Where a training job's wall time goes besides its epochs: start-up and stage boundaries.

    python bench/train_overhead.py [--checkout before=/path/to/old/checkout] [--checkout after=.]

For the demo config on the demo data, and for a fastai-shaped single stage (the demo's first stage for all
its epochs), each checkout runs `jobs/train.py` as a user does (its own local Ray), the checkouts alternating
config by config. Reported per run: the wall time of training (from the driver's "training ... on N images"
line, after Ray is up, to its "final:" line), the sum of the epoch times (metrics.csv), their ratio, and the
seconds between one stage's last epoch row and the next stage's first epoch starting (log timestamps: 1 s
resolution). The last line is JSON.
"""

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = re.compile(r"(\d\d:\d\d:\d\d) INFO planet_batch\.[\w.]+: (.*)")


def seconds(stamp: str) -> int:
    t = datetime.strptime(stamp, "%H:%M:%S")
    return t.hour * 3600 + t.minute * 60 + t.second


def run(checkout: Path, config: Path, data: Path, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(checkout)}
    proc = subprocess.run([sys.executable, str(checkout / "jobs/train.py"), "--config", str(config), "--data",
                           str(data), "--out", str(out)], cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{checkout}: training failed\n{proc.stderr[-3000:]}")
    lines = [m.groups() for m in map(STAMP.search, proc.stderr.splitlines()) if m]
    start = next(seconds(t) for t, msg in lines if msg.startswith("training "))
    end = next(seconds(t) for t, msg in lines if "final: F2" in msg)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    row_times = [seconds(t) for t, msg in lines if re.match(r"\d+ +\d\.\d+ ", msg)]  # epoch rows, in order
    boundaries = [row_times[i + 1] - float(rows[i + 1]["time"]) - row_times[i] for i in range(len(rows) - 1)
                  if rows[i + 1]["stage"] != rows[i]["stage"]]
    epochs = sum(float(r["time"]) for r in rows)
    return {"wall_s": end - start, "epoch_sum_s": round(epochs, 1), "ratio": round((end - start) / epochs, 2),
            "boundary_s": [round(b, 1) for b in boundaries], "f2": float(rows[-1]["fbeta"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkout", action="append", metavar="LABEL=PATH",
                   help="a planet-batch checkout to measure (repeatable; default: this one)")
    p.add_argument("--data", type=Path, help="a data root (default: `planet-batch demo-data`'s, generated)")
    p.add_argument("--config", type=Path, default=ROOT / "jobs/configs/demo.yaml", help="the multi-stage config")
    args = p.parse_args()
    checkouts = dict(c.split("=", 1) for c in (args.checkout or [f"this={ROOT}"]))
    demo = args.config.resolve()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "data"
            subprocess.run([sys.executable, "-m", "planet_batch.cli", "demo-data", str(data)], check=True,
                           capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        single = tmp / "single.yaml"
        text = demo.read_text()
        first = re.search(r"  - \{name: stage-1, .*\}", text)[0]
        total = sum(int(e) for e in re.findall(r"epochs: (\d+)", text))
        single.write_text(text[:text.index("stages:")] + "stages:\n"
                          + re.sub(r"epochs: \d+", f"epochs: {total}", first) + "\n")
        for name, config in (("demo config", demo), ("one stage", single)):
            for label, checkout in checkouts.items():
                r = {"config": name, "checkout": label,
                     **run(Path(checkout).resolve(), config, data, tmp / f"{label}-{len(results)}")}
                print(f"{name:>12} {label:>8}: wall {r['wall_s']} s, epochs {r['epoch_sum_s']} s, ratio "
                      f"{r['ratio']}, stage boundaries {r['boundary_s']} s, F2 {r['f2']:.4f}", flush=True)
                results.append(r)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
