"""The error a user can fix (a bad job file, an input or a setting that cannot work).
Its own module, with no imports, so `python -m curate.dataflow build-args` runs on a
plain python3; curate.config re-exports it."""


class ConfigError(ValueError):
    pass
