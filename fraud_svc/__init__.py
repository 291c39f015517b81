"""fraud_svc: fraud scoring (internal), reviews, blocks and the audit trail."""
