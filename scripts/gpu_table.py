"""Markdown table of a gpu_check.sh run's step variants, from its merged JSON (gpu_check_<date>_<device>.json), so
that README's and docs/performance.md's GPU figures are copied from one measurement, not retyped.

    python scripts/gpu_table.py build/gpu_check/gpu_check_<date>_<device>.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HEADER = ("| stage | variant | batch | iteration | images/s | vs eager | peak memory | MFU | compile | first steps vs "
          "eager | JS vs reverse KL |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _pct(v: float | None, signed: bool = False) -> str:
    return "" if v is None else f"{100 * v:+.2f}%" if signed else f"{100 * v:.1f}%"


def rows(doc: dict) -> list[str]:
    """One table row per measured variant of every stage that has variants (skipped ones say why)."""
    out = []
    for stage, entry in doc.get("stages", {}).items():
        variants = entry.get("figures", {}).get("variants", {})
        base = variants.get("eager", {}).get("images_per_s")
        for name, r in variants.items():
            if "skipped" in r:
                out.append(f"| {stage} | {name} | | | | | | | | | skipped: {r['skipped']} |")
                continue
            peak = r["peak_memory_gib"]
            label = name if name != "microbatch" else f"microbatch ({r['batch'] // r['single_micro_batch']['batch']}"\
                f" x {r['single_micro_batch']['batch']}: {_pct(r['overhead_vs_single'], True)} vs one)"
            out.append("| " + " | ".join([
                stage, label, str(r["batch"]), f"{1e3 * r['iteration_s']:.0f} ms", f"{r['images_per_s']:.0f}",
                f"{r['images_per_s'] / base:.2f}x" if base else "", "" if math.isnan(peak) else f"{peak:.1f} GiB",
                _pct(r.get("mfu")), f"{r['compile_s']:.0f} s",
                f"{r['max_rel_diff_vs_eager']:.1e}" if "max_rel_diff_vs_eager" in r else "",
                _pct(r.get("js_overhead"), True)]) + " |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("merged", help="gpu_check.sh's gpu_check_<date>_<device>.json")
    args = p.parse_args(argv)
    path = Path(args.merged)
    if not path.is_file():
        print(f"error: {path} not found (gpu_check.sh writes it into GPU_CHECK_OUT, default build/gpu_check)",
              file=sys.stderr)
        return 2
    doc = json.loads(path.read_text())
    table = rows(doc)
    if not table:
        print(f"error: {path} has no measured variants (stages: {', '.join(doc.get('stages', {})) or 'none'})",
              file=sys.stderr)
        return 1
    print(f"{doc.get('device', '?')}, {doc.get('date', '?')} ({path.name}):\n\n{HEADER}\n" + "\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
