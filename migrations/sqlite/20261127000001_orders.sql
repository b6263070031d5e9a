-- Orders and their idempotency keys (SQLite).
-- Ids are lower-case hyphenated UUID text, decimals normalized text, and times
-- integer microseconds since the Unix epoch (UTC).

create table orders (
    order_id          text    not null primary key,
    account_id        text    not null,
    client_request_id text    not null,
    symbol            text    not null,
    side              text    not null check (side in ('BUY', 'SELL')),
    order_type        text    not null check (order_type in ('LIMIT', 'MARKET')),
    quantity          text    not null,
    limit_price       text,
    time_in_force     text    not null check (time_in_force in ('GTC', 'IOC', 'FOK')),
    status            text    not null check (status in ('NEW', 'CANCELED')),
    create_time       integer not null,
    update_time       integer not null,
    check ((order_type = 'LIMIT') = (limit_price is not null))
) strict;

-- Listing an account's orders newest first, ties broken by order_id.
create index orders_by_account_time on orders (account_id, create_time, order_id);
-- GetOrder by client_request_id once its key has expired.
create index orders_by_account_key on orders (account_id, client_request_id, create_time);

create table idempotency_keys (
    account_id        text    not null,
    client_request_id text    not null,
    fingerprint       blob    not null,
    order_id          text    not null references orders (order_id) deferrable initially deferred,
    create_time       integer not null,
    expire_time       integer not null,
    primary key (account_id, client_request_id)
) strict, without rowid;

-- The purge finds expired keys without a scan.
create index idempotency_keys_by_expiry on idempotency_keys (expire_time);
