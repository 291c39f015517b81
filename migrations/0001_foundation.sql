-- The foundation: the vote package catalogue (read by VoteService.ListVotePackages) and the
-- append-only audit log that every operator action and fraud decision is written to.

-- Owner: vote_svc.
CREATE TABLE vote_packages (
    package_id        text PRIMARY KEY,
    display_name      text NOT NULL,
    votes             integer NOT NULL CHECK (votes > 0),
    bonus_votes       integer NOT NULL DEFAULT 0 CHECK (bonus_votes >= 0),
    -- Prices in micros of the currency (0.99 USD = 990000) so sums are exact.
    price_micros      bigint NOT NULL CHECK (price_micros > 0),
    currency_code     char(3) NOT NULL DEFAULT 'USD',
    -- The product ids the app stores sell this package under.
    apple_product_id  text NOT NULL UNIQUE,
    google_product_id text NOT NULL UNIQUE,
    sort_order        integer NOT NULL,
    active            boolean NOT NULL DEFAULT true
);

INSERT INTO vote_packages
    (package_id, display_name, votes, bonus_votes, price_micros,
     apple_product_id, google_product_id, sort_order)
VALUES
    ('votes_10',   '10 votes',             10,   0,   990000,
     'com.hangmeas.xfactor.votes10',   'votes_10',   1),
    ('votes_60',   '50 votes + 10 bonus',  50,  10,  3990000,
     'com.hangmeas.xfactor.votes60',   'votes_60',   2),
    ('votes_250',  '200 votes + 50 bonus', 200, 50,  9990000,
     'com.hangmeas.xfactor.votes250',  'votes_250',  3),
    ('votes_1200', '1000 votes + 200 bonus', 1000, 200, 39990000,
     'com.hangmeas.xfactor.votes1200', 'votes_1200', 4);

-- Owner: runtime (runtime/audit.py; every service writes through it).
CREATE TABLE audit_log (
    audit_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    actor_role     text NOT NULL,
    actor_subject  text NOT NULL,
    action         text NOT NULL,
    target         text NOT NULL,
    reason         text NOT NULL DEFAULT '',
    -- The inputs that led to the action, so an auditor can replay the decision.
    details        jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_target ON audit_log (target, recorded_at);

-- Append-only: the log may grow, never change.
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
