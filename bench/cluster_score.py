"""Scoring on a 2-node cluster by where the data lives, against one node: one run of each, same machine.

    python -m bench.cluster_score --n-images 2000 [--arch resnet34 --size 128]

Four jobs through Ray's job API (token auth on), each scoring the same N generated 256x256 JPEGs
(`--images`): (1) one node; (2) two nodes, data on the head only (the worker node runs in its own
mount namespace without the folder, so reads are pinned to the head); (3) the same two nodes, data on
a local S3 server (moto, real HTTP); (4) two nodes sharing the disk, `--data-shared`. Both nodes are
on this one 2-core machine, so a second node adds scheduling and object transfers, not CPUs: the
figures show what each placement costs, not a speed-up. The last line is JSON.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the cluster and S3 helpers the tests use

from clusters import run_job, s3_server, s3fs, two_node_cluster, upload  # noqa: E402

from bench.score_throughput import make_export, make_images  # noqa: E402


def score(cluster, export, images, out, *extra) -> dict:
    if not str(out).startswith("s3://"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_job(cluster, f"python jobs/score.py --model {export} --images {images} --out {out} --no-tta {' '.join(extra)}",
            timeout=1800)
    wall = time.perf_counter() - t0
    if str(out).startswith("s3://"):
        summary = json.loads(s3fs(cluster["env"]).open_input_stream("bench/out/score_summary.json").read())
    else:
        summary = json.loads(Path(out).with_name("score_summary.json").read_text())
    return {"images_per_s": summary["images_per_s"], "job_wall_s": round(wall, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--arch", default="resnet34")
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pb-cluster-bench-"))
    images = tmp / "data" / "test-jpg"
    make_images(images, args.n_images)
    export = make_export(tmp / "export", args.arch, args.size)
    results = {}
    with two_node_cluster(tmp, worker_node=False) as c:
        results["one_node"] = score(c, export, images, tmp / "one" / "submission.csv", "--overwrite")
    with s3_server(tmp) as s3_env:
        uri = upload(s3_env, images, "bench", "test-jpg")
        with two_node_cluster(tmp, hide=images.parent, env=s3_env) as c:
            results["two_nodes_data_on_head"] = score(c, export, images, tmp / "head" / "submission.csv")
            results["two_nodes_data_on_s3"] = score(c, export, uri, "s3://bench/out/submission.csv")
    with two_node_cluster(tmp) as c:
        results["two_nodes_shared_path"] = score(c, export, images, tmp / "shared" / "submission.csv", "--data-shared")
    base = results["one_node"]["images_per_s"]
    for r in results.values():
        r["vs_one_node"] = round(r["images_per_s"] / base, 2)
    for name, r in results.items():
        print(f"{name:<26} {r['images_per_s']:>7.1f} images/s  {r['vs_one_node']:.2f}x  (job {r['job_wall_s']} s)")
    print(json.dumps({"n_images": args.n_images, "arch": args.arch, "size": args.size, **results}))


if __name__ == "__main__":
    main()
