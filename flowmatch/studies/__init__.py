"""Studies: whole comparisons (variants x seeds under a budget) run as real fits and written up from MLflow.

spec: the study files (experiments/studies/*.yaml) and their plans; runner: the fits (and reflow
steps), resumable against the tracking store; results: docs/results.md and its plots from the runs.
The command is `python -m flowmatch study NAME --budget small`."""

from flowmatch.studies.spec import BUDGETS, PlannedRun, Study, StudyError, available_studies, load_study, plan

__all__ = ["BUDGETS", "PlannedRun", "Study", "StudyError", "available_studies", "load_study", "plan"]
