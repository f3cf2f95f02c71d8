"""Summary tables for docs/benchmarks/methods.md, read from `retrieve benchmark` JSON files.

python benchmarks/summarize_methods.py docs/benchmarks/runs/methods-run1.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TARGETS = {"busi": (0.81, 0.475), "byra_steatosis_liver_rois": (0.86, 0.64), "abdominal_us_organs": (0.99, 0.61)}
BASELINES = ("raw-pixels", "random-resnet18", "imagenet-effnet-lite0")
LABEL_FREE = ("simclr",)


def fmt(s: dict) -> str:
    if s.get("mean") is None:
        return "-"
    spread = f" (split {s['repeat_std']:.3f})" if s.get("repeat_std") is not None else ""
    return f"{s['mean']:.3f} ± {s['std']:.3f}{spread}"


def main(paths: list[str]) -> None:
    for path in paths:
        runs = json.loads(Path(path).read_text())
        print(f"\n#### {Path(path).name}\n")
        print(
            "| dataset | target (anchor; frozen alone) | best label-using method | its MAP | ImageNet features "
            "| random-init | raw pixels | simclr | simclr's backbone at init | target met |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            name = Path(r["dataset"]).name
            s = r["summary"]
            label_methods = {
                m: v for m, v in s.items() if m not in BASELINES and m not in LABEL_FREE and not m.startswith("random-")
            }
            best = max(label_methods, key=lambda m: label_methods[m]["map"]["mean"]) if label_methods else None
            target = TARGETS.get(name)
            t_text = f"{target[0]:.2f} ({target[1]:.3f})" if target else "-"
            met = "-" if not target or not best else ("yes" if label_methods[best]["map"]["mean"] > target[0] else "no")
            cells = [fmt(s[b]["map"]) if b in s else "-" for b in BASELINES]
            simclr = fmt(s["simclr"]["map"]) if "simclr" in s else "-"
            cfg = r.get("methods", {}).get("simclr", {})
            init_name = f"random-{cfg.get('encoder')}-{cfg.get('image_size')}px"
            init = fmt(s[init_name]["map"]) if init_name in s else "-"
            print(
                f"| {name} | {t_text} | {best or '-'} | {fmt(label_methods[best]['map']) if best else '-'} "
                f"| {cells[2]} | {cells[1]} | {cells[0]} | {simclr} | {init} | {met} |"
            )


if __name__ == "__main__":
    main(sys.argv[1:])
