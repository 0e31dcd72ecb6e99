"""`curate inspect`'s per-cluster table, on a hand-built kept/rejected pair."""

import pyarrow as pa

from curate.report.inspect import cluster_table


def test_cluster_table_counts_pool_and_kept_rows_and_shows_budgets():
    kept = pa.table({"cluster": [0, 0, 1, 2], "cluster_budget": [2, 2, 1, 1], "cds": [0.5, 0.5, 0.25, 0.125]})
    # the selector's rejects carry their cluster; a filter's rejects have none
    rejected = pa.table({"cluster": [0, 0, 0, 1, 1, 3, None]})
    lines = cluster_table(kept, rejected)
    assert lines[0] == "clusters: 3 of 4 covered"
    assert lines[1].split() == ["cluster", "pool", "rows", "kept", "cluster_budget", "cds"]
    rows = [line.split() for line in lines[2:]]
    # largest pool first: cluster 0 has 2 kept + 3 rejected, cluster 1 has 1 + 2, 2 and 3 one each
    assert rows == [["0", "5", "2", "2", "0.5"], ["1", "3", "1", "1", "0.25"],
                    ["2", "1", "1", "1", "0.125"], ["3", "1", "0", "None", "None"]]


def test_cluster_table_without_rejected_rows_and_long_tail():
    kept = pa.table({"cluster": list(range(25))})
    lines = cluster_table(kept, None, max_rows=20)
    assert lines[0] == "clusters: 25 of 25 covered"
    assert len(lines) == 2 + 20 + 1 and lines[-1] == "  ... 5 smaller clusters"
