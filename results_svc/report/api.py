"""ReportService: the post-show report, for operators (runtime.access)."""

from __future__ import annotations

from typing import Any

from results_svc.report.report import Reports
from runtime import ids
from televote.results.v1 import report_service_pb2 as pb
from televote.results.v1 import report_service_pb2_grpc as pb_grpc


class ReportServicer(pb_grpc.ReportServiceServicer):
    def __init__(self, reports: Reports) -> None:
        self._reports = reports

    async def GetEpisodeReport(self, request: pb.GetEpisodeReportRequest, context: Any
                               ) -> pb.GetEpisodeReportResponse:
        episode_id = ids.parse(request.episode_id, "episode_id")
        return await self._reports.episode_report(episode_id)
