"""The measured skills demo (docs/reports/skills.md): its data preparation, the hand-written development and
held-out prompt sets, gate comparisons and scoring. Experiment code, not part of the installed library; run it
from the repository root: ``python -m bench.skills_demo.demo --help``."""
