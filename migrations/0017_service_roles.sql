-- Least privilege (issue 21): one group role per service holding exactly the grants its SQL
-- needs; the login role each service connects as (made by ops/roles.py, with a SCRAM password
-- kept in that service's state directory) is a member of its group and nothing else.
-- Migrations keep running as the owner of the schema, the one role that may change it.
-- depends: 0012_round_tally_slots 0013_seed_defaults 0014_sms 0015_purchases

-- Roles belong to the cluster, not the database: another database of the same cluster may
-- have made them already.
DO $$
DECLARE
    service text;
BEGIN
    FOREACH service IN ARRAY ARRAY['sync_svc', 'vote_svc', 'fraud_svc', 'results_svc', 'sms_svc']
    LOOP
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE'
                           ' NOREPLICATION NOBYPASSRLS', 'televote_' || service);
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;
        END;
    END LOOP;
END $$;

-- Nobody but the owner creates objects or reads what was not granted.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public
    TO televote_sync_svc, televote_vote_svc, televote_fraud_svc, televote_results_svc,
       televote_sms_svc;
-- Identity columns (audit_log, fraud_reviews) draw from sequences.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public
    TO televote_sync_svc, televote_vote_svc, televote_fraud_svc, televote_results_svc,
       televote_sms_svc;

-- The trigger logs that results_svc's checkpoint reads are written by whoever inserts a vote,
-- a rejection or a credit: as their owner, so no writer needs a grant on the logs.
ALTER FUNCTION ledger_appends_log() SECURITY DEFINER SET search_path = public;
ALTER FUNCTION result_input_changes_log() SECURITY DEFINER SET search_path = public;

-- sync_svc owns shows, episodes, contestants, rounds, performances and the show event outbox.
GRANT SELECT, INSERT, UPDATE ON shows, episodes, contestants, rounds, performances, show_events
    TO televote_sync_svc;
GRANT SELECT ON votes TO televote_sync_svc;
GRANT SELECT, INSERT ON request_outcomes TO televote_sync_svc;

-- vote_svc owns the ledger, tallies, free-vote usage, wallets and their credits.
GRANT SELECT ON shows, episodes, contestants, rounds, vote_packages, round_results
    TO televote_vote_svc;
GRANT SELECT, INSERT ON votes, wallet_credits, vote_fraud_decisions, audit_log,
    request_outcomes
    TO televote_vote_svc;
GRANT SELECT, INSERT, UPDATE ON round_tallies, free_vote_usage, wallets TO televote_vote_svc;
GRANT SELECT, INSERT ON purchases, purchase_refunds, purchase_consumptions TO televote_vote_svc;
GRANT SELECT, INSERT, UPDATE ON purchase_poll_state TO televote_vote_svc;

-- fraud_svc owns reviews, rejections, blocks, travellers and policies.
GRANT SELECT ON shows, episodes, rounds, votes, round_results TO televote_fraud_svc;
GRANT SELECT, INSERT ON audit_log, fraud_rejections, request_outcomes TO televote_fraud_svc;
GRANT SELECT, INSERT, UPDATE ON fraud_reviews, fraud_blocks, fraud_policies TO televote_fraud_svc;
GRANT SELECT, INSERT, UPDATE, DELETE ON fraud_travellers TO televote_fraud_svc;

-- results_svc owns final results, their leaves and blocks, checkpoints and ledger keys.
GRANT SELECT ON shows, episodes, contestants, rounds, votes, round_tallies, wallets,
    wallet_credits, fraud_rejections, vote_fraud_decisions
    TO televote_results_svc;
GRANT SELECT, INSERT ON round_results, round_result_invalid_votes, round_result_block_roots,
    ledger_keys
    TO televote_results_svc;
-- A checkpoint writes leaves and blocks before the round has a result and discards them when
-- it starts over; once the result is stored their triggers refuse any change.
GRANT SELECT, INSERT, DELETE ON round_result_leaves, round_result_blocks TO televote_results_svc;
GRANT SELECT, INSERT, UPDATE, DELETE ON round_checkpoints, round_checkpoint_roots,
    round_checkpoint_invalid
    TO televote_results_svc;
GRANT SELECT, DELETE ON ledger_appends, result_input_changes TO televote_results_svc;

-- sms_svc owns short codes, messages, outcomes, delivery reports and reply addresses.
GRANT SELECT ON shows, episodes, contestants, rounds, votes, fraud_rejections, sms_records
    TO televote_sms_svc;
GRANT SELECT, INSERT, UPDATE ON sms_short_codes TO televote_sms_svc;
GRANT SELECT, INSERT ON sms_messages, sms_outcomes, sms_deliveries, audit_log,
    request_outcomes
    TO televote_sms_svc;
GRANT SELECT, INSERT, DELETE ON sms_reply_addresses TO televote_sms_svc;

-- Append-only tables: whatever a later migration grants by mistake, no service changes or
-- empties them (their triggers refuse too, but a superuser can switch triggers off with
-- session_replication_role; no service role can set it: it is a superuser setting).
REVOKE UPDATE, DELETE, TRUNCATE ON votes, audit_log, fraud_rejections, vote_fraud_decisions,
    round_results, round_result_invalid_votes, round_result_block_roots, ledger_keys,
    purchases, purchase_refunds, purchase_consumptions, sms_messages, sms_outcomes,
    sms_deliveries
    FROM televote_sync_svc, televote_vote_svc, televote_fraud_svc, televote_results_svc,
         televote_sms_svc;
