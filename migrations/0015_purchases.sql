-- Vote packages bought in the App Store and Google Play, and their refunds (vote_svc's:
-- vote_packages and wallets are altered, four tables created).
-- depends: 0004_votes

-- The seed's store SKUs (com.hangmeas.votes.N on iOS, votes_N on Android, N = votes bought),
-- for rows that still carry the first catalogue's ids; where an earlier migration set the
-- specification's SKUs already, nothing is left to change here. A deployment with its own
-- app sets its product ids in vote_packages; bundle id and package name are vote_svc's
-- configuration (VOTE_APPLE_BUNDLE_ID, VOTE_GOOGLE_PACKAGE_NAME).
UPDATE vote_packages
   SET apple_product_id = 'com.hangmeas.votes.' || votes,
       google_product_id = 'votes_' || votes
 WHERE apple_product_id LIKE 'com.hangmeas.xfactor.votes%';

-- Votes taken back from the unspent balance by refunds. `credited` stays the paid votes ever
-- credited (the final result's recount caps a voter's paid votes by it, so a refund never
-- changes a result), and the balance is credited - spent - clawed_back.
ALTER TABLE wallets ADD COLUMN clawed_back bigint NOT NULL DEFAULT 0;
ALTER TABLE wallets DROP CONSTRAINT wallet_not_overspent;
ALTER TABLE wallets ADD CONSTRAINT wallet_not_overspent CHECK (spent + clawed_back <= credited);

-- Owner: vote_svc.
-- One row per credited store purchase. Append-only: a refund is a row of purchase_refunds.
CREATE TABLE purchases (
    purchase_id          uuid PRIMARY KEY,
    request_id           text NOT NULL UNIQUE,
    user_id              text NOT NULL,
    store                text NOT NULL CHECK (store IN ('APPLE', 'GOOGLE')),
    -- Apple transactionId / Google orderId: what credits once, across users.
    store_transaction_id text NOT NULL,
    -- Apple originalTransactionId; Google: the purchase token (notifications and the Voided
    -- Purchases API name a purchase by it, and a failed consumption is retried with it).
    store_reference      text NOT NULL,
    environment          text NOT NULL,
    package_id           text NOT NULL,
    product_id           text NOT NULL,
    votes                integer NOT NULL CHECK (votes > 0),
    bonus_votes          integer NOT NULL CHECK (bonus_votes >= 0),
    price_micros         bigint NOT NULL,
    currency_code        char(3) NOT NULL,
    -- What the store says the buyer paid, when it says (Apple: price and currency).
    store_price_micros   bigint,
    store_currency       text,
    purchased_at         timestamptz NOT NULL,
    credited_at          timestamptz NOT NULL DEFAULT now(),
    balance_after        bigint NOT NULL,
    -- SHA-256 of (user, store, package, receipt): a retry of the request id must match it.
    fingerprint          bytea NOT NULL,
    UNIQUE (store, store_transaction_id)
);
CREATE INDEX purchases_by_user ON purchases (user_id);
CREATE INDEX purchases_by_reference ON purchases (store, store_reference);

-- Owner: vote_svc.
-- A refund or revocation of a purchase, applied once. `clawed_back` came out of the unspent
-- balance; `already_spent` votes had been cast before the refund and stay counted (see
-- vote_svc/README.md, Purchases: refunds never change a result); such a voter is flagged.
CREATE TABLE purchase_refunds (
    refund_id          uuid PRIMARY KEY,
    purchase_id        uuid NOT NULL UNIQUE REFERENCES purchases,
    user_id            text NOT NULL,
    -- APPLE_NOTIFICATION, GOOGLE_RTDN or GOOGLE_VOIDED_POLL.
    source             text NOT NULL,
    -- The store's words: Apple's notification type/subtype and revocation reason, Google's
    -- voided source and reason.
    store_reason       text NOT NULL,
    refunded_at        timestamptz NOT NULL,
    recorded_at        timestamptz NOT NULL DEFAULT now(),
    votes_credited     integer NOT NULL,
    clawed_back        integer NOT NULL CHECK (clawed_back >= 0),
    already_spent      integer NOT NULL CHECK (already_spent >= 0),
    flagged_for_review boolean NOT NULL,
    CHECK (clawed_back + already_spent = votes_credited)
);
CREATE INDEX purchase_refunds_flagged ON purchase_refunds (recorded_at) WHERE flagged_for_review;

-- Owner: vote_svc.
-- Google Play purchases consumed after their credit (an unconsumed purchase cannot be bought
-- again, and Google refunds it by itself after three days): the poller consumes what is
-- missing here.
CREATE TABLE purchase_consumptions (
    purchase_id uuid PRIMARY KEY REFERENCES purchases,
    consumed_at timestamptz NOT NULL DEFAULT now()
);

-- Owner: vote_svc.
-- Where the Voided Purchases API poll got to (one row; replicas take turns with a lock).
CREATE TABLE purchase_poll_state (
    name       text PRIMARY KEY,
    polled_to  timestamptz NOT NULL
);

CREATE FUNCTION purchases_are_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER purchases_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON purchases
    FOR EACH STATEMENT EXECUTE FUNCTION purchases_are_append_only();
CREATE TRIGGER purchase_refunds_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON purchase_refunds
    FOR EACH STATEMENT EXECUTE FUNCTION purchases_are_append_only();
CREATE TRIGGER purchase_consumptions_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON purchase_consumptions
    FOR EACH STATEMENT EXECUTE FUNCTION purchases_are_append_only();
