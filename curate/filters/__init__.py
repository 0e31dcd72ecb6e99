"""Filters: per-example ones and the whole-pool steps (exact and near dedup,
decontamination); each registers itself by its config `type` (curate.steps)."""
