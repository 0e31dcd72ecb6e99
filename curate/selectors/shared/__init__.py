"""What the selection methods share, each once, beneath the method modules:
k-means and the one cluster-assignment step (`kmeans`), spectral clustering
(`spectral`), PASER's concept graph (`concept_graph`), budgets per cluster (`quotas`), global top-N
cut-offs (`cutoff`) and seeded row hashing (`keys`). No module here
imports a method module."""
