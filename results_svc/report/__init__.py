"""The post-show report (ReportService): `report` computes it, `api` serves it."""
