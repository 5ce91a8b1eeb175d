"""Run reports: ``report.md`` plus plots rebuilt from a run directory's metrics and summary files."""
