"""Retrieval metrics (MAP, MRR, P@k, MAP@R), leave-one-out evaluation, and reports."""
