-- report_round_voters, report_episode_voters (owner: results_svc): room on each page for the
-- rollup's updates. A voter's rows are updated at every step in which they vote (and again
-- when placed); with full pages each update wrote the row to another page and a new entry in
-- every index of the table; with room left, the update stays on the page and no index is
-- touched (a HOT update: no indexed column changes). Applies to pages written from now on.
-- depends: 0022_report-10m_set_based_rollups

ALTER TABLE report_round_voters SET (fillfactor = 75);
ALTER TABLE report_episode_voters SET (fillfactor = 75);
