"""Per-stage evaluations on held-out subjects, each beside its trivial baseline, and their reports."""
