"""Copy one GPU run's results into ``bench/results/<date>-<gpu>/``, the project's evidence folder.

    python -m bench.publish OUT_DIR [--plots] [--dest bench/results]

OUT_DIR is what ``bench/gpu_check.sh OUT_DIR`` (or ``python -m bench --out OUT_DIR``) wrote. The
JSON files, the markdown tables, the logs and the stage summary are copied; PNG plots only with
``--plots``. A run without a GPU is refused unless ``--allow-cpu``.
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def read_env(out_dir):
    """The run's environment record: env.json from gpu_check.sh, else the one inside step/batch JSON."""
    for name in ("env.json", "step.json", "batch.json"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return data.get("env", data)
    raise SystemExit(f"{out_dir} holds no env.json, step.json or batch.json")


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder a GPU run wrote")
    parser.add_argument("--dest", default=RESULTS, help="results root (default: bench/results)")
    parser.add_argument("--plots", action="store_true", help="copy the PNG plots as well")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="publish a run measured without a GPU (bench/results/ is for GPU runs)")
    args = parser.parse_args(argv)

    env = read_env(args.out_dir)
    name = env.get("device_name") or "unknown"
    if env.get("device") != "cuda" and not args.allow_cpu:
        raise SystemExit(f"{args.out_dir} was measured on {name}, not a GPU: bench/results/ holds GPU "
                         "runs (--allow-cpu to publish it anyway)")
    base = os.path.join(args.dest, f"{env.get('date', 'undated')}-{slug(name)}")
    target, n = base, 1
    while os.path.exists(target):
        n += 1
        target = f"{base}-{n}"
    patterns = ["*.json", "*.md", "*.log", "*.txt", "cpu/*.json", "cpu/*.md"] + (["*.png"] if args.plots else [])
    files = sorted({p for pattern in patterns for p in glob.glob(os.path.join(args.out_dir, pattern))})
    files = [p for p in files if not p.endswith(".tmp")]
    if not files:
        raise SystemExit(f"nothing to publish in {args.out_dir}")
    for path in files:
        rel = os.path.relpath(path, args.out_dir)
        os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
        shutil.copy2(path, os.path.join(target, rel))
    print(f"copied {len(files)} files to {target}")
    for path in files:
        print("  " + os.path.relpath(path, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
