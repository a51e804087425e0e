"""The README's demo figures, produced by running the demo: wall time per stage and end to end,
and the science it prints (slides, tiles, genes, classifier accuracy, planted recall, top
genes), with the machine they came from. Writes ``benchmarks/README_demo.md``.

    python benchmarks/demo_figures.py [--keep DIR] [demo options, e.g. --seed 0]

Runs ``gtex-assets demo`` in a fresh data root (deleted afterwards unless ``--keep``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "README_demo.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    cpu = names[0] if names else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; 1-min load at start "
            f"{load:.2f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", help="keep the data root here")
    args, demo_args = ap.parse_known_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gtex-demo-"))
    env = {**os.environ, "GTEX_DATA_ROOT": str(root)}
    env.pop("DAGSTER_HOME", None)
    env.pop("GTEX_SOURCE", None)
    where = machine()
    exe = Path(sys.executable).parent / "gtex-assets"
    t0 = time.perf_counter()
    proc = subprocess.run([str(exe), "demo", *demo_args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("[demo]", "  "))]
    stages, last = [], None
    for ln in lines:
        if m := re.match(r"\[demo\] → (.*)", ln):
            last = m.group(1)
        elif (m := re.match(r"\[demo\]\s+done in ([\d.]+)s", ln)) and last:
            stages.append((last, float(m.group(1))))
        elif m := re.match(r"\[demo\]\s+(\d+) slides.*\(([\d.]+)s\)", ln):
            stages.append(("generate the mirror", float(m.group(2))))
    summary = [ln.strip() for ln in proc.stdout.split("Summary:", 1)[-1].splitlines() if ln.strip()]
    rows = "\n".join(f"| {name[:90]} | {s:.1f} |" for name, s in stages)
    text = f"""# Demo figures

Produced by `python benchmarks/demo_figures.py` ({time.strftime("%Y-%m-%d")}): `gtex-assets demo`
with its defaults in a fresh data root, on {where}.

**End to end: {wall:.0f} s** (the command's wall time, mirror generation included).

| stage | seconds |
|---|---|
{rows}

The summary the demo printed:

```
{chr(10).join(summary)}
```
"""
    OUT.write_text(text)
    print(text)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
