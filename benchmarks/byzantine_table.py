"""Tables of a finished ``sgdlab compare --preset byzantine`` (or ``byzantine-quick`` / ``byzantine-charlm``) run.

    python benchmarks/byzantine_table.py runs/byzantine                       # every setting, every attack
    python benchmarks/byzantine_table.py runs/byzantine --worst               # worst case per rule and setting
    python benchmarks/byzantine_table.py runs/byzantine-charlm --metric final_val_loss

Run names are the presets' ``<split>-f<F>-<rule>-<attack>`` and ``<split>-clean-mean``. A run that stopped
(the NaN/Inf message, status ``diverged``) is shown as "stopped". The worst case of a rule is taken over every
attack of its setting and only when every attack ran and none stopped; with ``--metric final_val_loss``
the worst is the highest loss.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ATTACKS = ["signflip", "labelflip", "gaussian200", "alie", "ipm0.1", "ipm100", "mimic", "nan"]
PRE = ("nnm", "bucketing", "arc")


def load(root: Path) -> dict[str, dict]:
    return {s.parent.name: json.loads(s.read_text()) for s in sorted(root.glob("*/summary.json"))}


def settings(runs: dict[str, dict]) -> dict[tuple[str, int], dict[str, dict[str, dict]]]:
    """(split tag, f) -> rule -> attack -> summary."""
    out: dict[tuple[str, int], dict[str, dict[str, dict]]] = {}
    for name, summary in runs.items():
        parts = name.split("-")
        if len(parts) < 4 or not parts[1].startswith("f") or not parts[1][1:].isdigit():
            continue
        attack = parts[-1]
        if attack not in ATTACKS:
            continue
        rule = "-".join(parts[2:-1])
        out.setdefault((parts[0], int(parts[1][1:])), {}).setdefault(rule, {})[attack] = summary
    return out


def value(summary: dict | None, metric: str) -> float | None:
    if summary is None or summary.get("status") != "completed":
        return None
    return summary.get(metric)


def rule_label(rule: str) -> str:
    pre, _, rest = rule.partition("-")
    return f"{pre} → {rest}" if pre in PRE and rest else rule


def worst(cells: dict[str, dict], attacks: list[str], metric: str) -> float | None:
    vals = [value(cells.get(a), metric) for a in attacks]
    if any(v is None for v in vals):
        return None
    return max(vals) if "loss" in metric else min(vals)


def order(rules) -> list[str]:
    return sorted(rules, key=lambda r: (r != "mean", r.split("-")[0] in PRE, r))


def full_tables(runs: dict[str, dict], metric: str) -> str:
    lines = []
    for (tag, f), rules in sorted(settings(runs).items()):
        clean = value(runs.get(f"{tag}-clean-mean"), metric)
        attacks = [a for a in ATTACKS if any(a in c for c in rules.values())]
        lines += ["", f"**{tag}, f = {f}** (clean mean: {clean:.3f})" if clean is not None else f"**{tag}, f = {f}**",
                  "", "| rule | " + " | ".join(attacks) + " | worst |", "|---" * (len(attacks) + 2) + "|"]
        for rule in order(rules):
            cells = []
            for a in attacks:
                s = rules[rule].get(a)
                v = value(s, metric)
                cells.append("–" if s is None else "stopped" if v is None else f"{v:.3f}")
            w = worst(rules[rule], attacks, metric) if rule != "mean" else None
            lines.append(f"| {rule_label(rule)} | " + " | ".join(cells) + f" | {'–' if w is None else f'{w:.3f}'} |")
    return "\n".join(lines)


def worst_table(runs: dict[str, dict], metric: str) -> str:
    table = settings(runs)
    keys = sorted(table)
    rules = order({r for k in keys for r in table[k]} - {"mean"})
    head = [f"{tag} f = {f}" for tag, f in keys]
    cleans = [value(runs.get(f"{tag}-clean-mean"), metric) for tag, _ in keys]
    lines = ["| rule | " + " | ".join(head) + " |", "|---" * (len(keys) + 1) + "|",
             "| clean mean | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cleans) + " |"]
    for rule in rules:
        cells = []
        for k, clean in zip(keys, cleans, strict=True):
            attacks = [a for a in ATTACKS if any(a in c for c in table[k].values())]
            w = worst(table[k].get(rule, {}), attacks, metric)
            gap = "" if w is None or clean is None else f" ({100 * (w - clean):+.1f})"
            cells.append("–" if w is None else f"{w:.3f}{gap}")
        lines.append(f"| {rule_label(rule)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--metric", default="val_accuracy")
    ap.add_argument("--worst", action="store_true", help="one table: each rule's worst case per setting")
    a = ap.parse_args()
    runs = load(a.root)
    print(worst_table(runs, a.metric) if a.worst else full_tables(runs, a.metric))


if __name__ == "__main__":
    main()
