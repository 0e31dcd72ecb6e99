"""Selection methods, one module each; each registers itself by its config `type`
(curate.steps)."""
