"""results_svc: live tallies, result streams, final results and reports."""
