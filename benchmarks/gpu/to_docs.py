"""``step_latency_gpu.py --json`` -> ``docs/step_latency_gpu.json`` (per tree and optimizer:
the default's and torch fused's median ms, every other contender's, the card) and the markdown
tables of ``docs/gpu.md`` on stdout.

    python benchmarks/gpu/to_docs.py RUN.json [docs/step_latency_gpu.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = ["default", "graph", "packed", "torch_fused", "torch_foreach", "optax"]


def main() -> None:
    run = json.loads(Path(sys.argv[1]).read_text())
    out = {
        "card": run["card"],
        "mlx": run["mlx"],
        "unit": "median ms per step, every new array materialised",
        "trees": {},
        "nested_adam_lora_period_mean": run.get("nested_adam_lora"),
        "launch_sweep_lora_adam": run.get("launch_sweep_lora_adam"),
    }
    lines = []
    for tree, t in run["trees"].items():
        rows = {}
        lines += [f"**{t['title']}** ({run['card']}, median ms)", ""]
        lines += ["| optimizer | " + " | ".join(COLS) + " | default / torch fused |"]
        lines += ["|---" * (len(COLS) + 2) + "|"]
        for name, row in t["rows"].items():
            rows[name] = {k: row.get(k) for k in COLS if k in row}
            rows[name]["default_checks"] = row.get("info", {}).get("checks")
            cells = [f"{row[k]:.3f}" if k in row else "-" for k in COLS]
            ratio = (
                f"{row['default'] / row['torch_fused']:.2f}x"
                if "torch_fused" in row and "default" in row
                else "-"
            )
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
        out["trees"][tree] = {"title": t["title"], "rows": rows}
        lines.append("")
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
