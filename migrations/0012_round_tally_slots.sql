-- Alters round_tallies (owner: vote_svc).
-- round_tallies had one row per (round, contestant, vote type, channel): every ledger batch of
-- every vote_svc replica updated the same few rows, so concurrent batches queued on their row
-- locks until the holder committed, and one slow holder (descheduled on a busy machine) held
-- up every replica's commits: at a fifth of the vote path's capacity PostgreSQL logged
-- batches waiting 20 ms and more, five deep, on one tally row. Each writing connection now
-- bumps rows of its own (`slot`: its backend pid, unique among live connections), so batches
-- in flight together never share a tally row; readers sum over the slots, as they already
-- summed over vote types and channels.
-- depends: 0004_votes

ALTER TABLE round_tallies ADD COLUMN slot integer NOT NULL DEFAULT 0;
ALTER TABLE round_tallies DROP CONSTRAINT round_tallies_pkey;
ALTER TABLE round_tallies ADD PRIMARY KEY (round_id, contestant_id, vote_type, channel, slot);
