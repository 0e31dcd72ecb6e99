"""curate: data selection and curation for instruction tuning."""

__version__ = "0.3.0"
