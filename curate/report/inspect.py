"""`curate inspect OUT_DIR`: what a run kept and why, as text."""

from __future__ import annotations

import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from curate.config import ConfigError
from curate.published import reading
from curate.records import BASE_COLUMNS


def _load(path: str):
    import datasets

    if not os.path.exists(os.path.join(path, "manifest.json")):
        raise ConfigError(f"{path}: not a published curate output (no manifest.json); did the run finish?")
    return datasets.load_from_disk(path)


def summarise_column(table: pa.Table, name: str) -> str | None:
    col = table.column(name)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        valid = pc.drop_null(col)
        if len(valid) == 0:
            return f"{name:<22} all null"
        q = pc.quantile(valid, q=[0.0, 0.5, 1.0])
        return (f"{name:<22} mean {pc.mean(valid).as_py():>10.4g}  min {q[0].as_py():>10.4g}  "
                f"median {q[1].as_py():>10.4g}  max {q[2].as_py():>10.4g}")
    if pa.types.is_boolean(col.type):
        return f"{name:<22} true {pc.sum(col).as_py() or 0} of {len(col)}"
    return None


# per-cluster values a selector writes on every row of a cluster (the same on each row)
CLUSTER_COLUMNS = ("cluster_size", "cluster_budget", "cluster_quota", "cluster_weight", "cds")


def _rejected_table(path: str) -> pa.Table | None:
    rejected = os.path.join(path, "rejected")
    if not os.path.exists(os.path.join(rejected, "state.json")):
        return None
    import datasets

    return datasets.load_from_disk(rejected).data.table


def cluster_table(kept: pa.Table, rejected: pa.Table | None, max_rows: int = 20) -> list[str]:
    """Per cluster: rows in the pool (kept + rejected by the selector), rows kept, and the
    selector's per-cluster columns (budget, quota, degradation), largest clusters first."""
    kept_n = Counter(kept.column("cluster").to_pylist())
    pool_n = Counter(kept_n)
    if rejected is not None and "cluster" in rejected.column_names:
        pool_n.update(c for c in rejected.column("cluster").to_pylist() if c is not None)
    columns = [c for c in CLUSTER_COLUMNS if c in kept.column_names]
    values: dict = {}
    for row in kept.select(["cluster"] + columns).to_pylist():
        values.setdefault(row["cluster"], row)
    lines = [f"clusters: {len(kept_n)} of {len(pool_n)} covered",
             "  " + "".join(f"{h:>15}" for h in ["cluster", "pool rows", "kept"] + columns)]
    order = sorted(pool_n, key=lambda c: (-pool_n[c], c))
    for c in order[:max_rows]:
        cells = [c, pool_n[c], kept_n.get(c, 0)] + [values.get(c, {}).get(k) for k in columns]
        lines.append("  " + "".join(f"{v:>15.4g}" if isinstance(v, float) else f"{str(v):>15}"
                                    for v in cells))
    if len(order) > max_rows:
        lines.append(f"  ... {len(order) - max_rows} smaller clusters")
    return lines


def inspect_output(path: str, n_examples: int = 3) -> str:
    with reading(path):  # one run's files, not a mix with a run publishing meanwhile
        return _inspect(path, n_examples)


def _inspect(path: str, n_examples: int) -> str:
    ds = _load(path)
    table = ds.data.table
    out = [f"{path}: {len(ds):,} kept examples, {len(table.column_names)} columns"]
    manifest_path = os.path.join(path, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            m = json.load(fh)
        c = m["counts"]
        failed = c.get("score_failed")  # one entry per scorer; none without scorers
        parts = [f"read {c['read']:,} = invalid {c['invalid']:,} + examples {c['examples']:,}",
                 f"filtered {sum(c['filtered'].values()):,} {c['filtered'] or ''}"]
        if failed:
            parts.append(f"score failed {sum(failed.values()):,} {failed} (dead letter)")
        if sum((c.get("from_saved") or {}).values()):
            parts.append(f"scores from saved work {c['from_saved']}")
        parts += [f"not selected {sum(c['not_selected'].values()):,} {c['not_selected'] or ''}",
                  f"kept {c['kept']:,}"]
        out.append("counts: " + "; ".join(parts))
        out.append("steps: " + ", ".join(s["type"] for k in ("scorers", "selectors")
                                         for s in m["plan"][k]) if any(m["plan"][k] for k in ("scorers", "selectors")) else "steps: none")
    out.append("sources: " + ", ".join(f"{k} {v:,}" for k, v in Counter(table.column("source").to_pylist()).most_common()))
    extra = [c for c in table.column_names if c not in BASE_COLUMNS]
    if extra:
        out.append("score columns:")
        for name in extra:
            line = summarise_column(table, name)
            if line:
                out.append("  " + line)
    if "cluster" in table.column_names:
        out += cluster_table(table, _rejected_table(path))
    for row in ds.select(range(min(n_examples, len(ds)))):
        scores = {k: row[k] for k in extra if isinstance(row[k], (int, float, bool))}
        out.append(f"--- {row['id']} ({row['origin']}) {json.dumps(scores)}")
        out.append(f"  prompt:   {row['prompt'][:200]!r}")
        out.append(f"  response: {row['response'][:200]!r}")
    return "\n".join(out)
