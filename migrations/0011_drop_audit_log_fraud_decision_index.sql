-- Alters audit_log's indexes (owner: runtime; the index served fraud_svc).
-- audit_log_fraud_decision (0003) indexed fraud.score entries by their decision id, yet no
-- query looks a decision up by it: fraud_svc's RPCs list the audit trail by user, round,
-- actor, action and time (audit_log_fraud_user, audit_log_fraud_recent), and a vote's
-- decision is found by the vote's ref, which is the entry's target (audit_log_target; the
-- ledger keeps the ref with fraud_decision_id). Every REVIEW and BLOCK writes an audit_log
-- row inside the scoring RPC, so each index costs every such vote: this one was ~8 % of
-- PostgreSQL's CPU per scored batch.
-- depends: 0003_fraud

DROP INDEX IF EXISTS audit_log_fraud_decision;
