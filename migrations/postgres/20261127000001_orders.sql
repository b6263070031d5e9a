-- Orders and their idempotency keys (Postgres), in native types.

create table orders (
    order_id          uuid           not null primary key,
    account_id        text           not null,
    client_request_id uuid           not null,
    symbol            text           not null,
    side              text           not null check (side in ('BUY', 'SELL')),
    order_type        text           not null check (order_type in ('LIMIT', 'MARKET')),
    quantity          numeric(38,18) not null check (quantity > 0),
    limit_price       numeric(38,18) check (limit_price > 0),
    time_in_force     text           not null check (time_in_force in ('GTC', 'IOC', 'FOK')),
    status            text           not null check (status in ('NEW', 'CANCELED')),
    create_time       timestamptz    not null,
    update_time       timestamptz    not null,
    check ((order_type = 'LIMIT') = (limit_price is not null))
);

-- Listing an account's orders newest first, ties broken by order_id.
create index orders_by_account_time on orders (account_id, create_time, order_id);
-- GetOrder by client_request_id once its key has expired.
create index orders_by_account_key on orders (account_id, client_request_id, create_time);

create table idempotency_keys (
    account_id        text        not null,
    client_request_id uuid        not null,
    fingerprint       bytea       not null,
    order_id          uuid        not null references orders (order_id) deferrable initially deferred,
    create_time       timestamptz not null,
    expire_time       timestamptz not null,
    primary key (account_id, client_request_id)
);

-- The purge finds expired keys without a scan.
create index idempotency_keys_by_expiry on idempotency_keys (expire_time);
