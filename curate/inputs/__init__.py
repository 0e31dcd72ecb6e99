"""Reading inputs, the one path for every reader: planning files (globs, formats,
adapters: `files.plan_inputs`), reading rows (`formats`), turning them into records or
dead-letter rows (`files.task_records`). The pipeline's Beam read step wraps it
(`curate.pipeline.readers`); the trainer, pruning calibration and model stages call
`files.read_records` in-process."""
