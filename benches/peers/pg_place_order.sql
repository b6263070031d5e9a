-- The transaction a user writes by hand for an idempotent order (issue 19):
-- the key with ON CONFLICT DO NOTHING, then the order, in one transaction,
-- prepared (pgbench -M prepared). The same rows the service writes.
SELECT gen_random_uuid() AS k, gen_random_uuid() AS o \gset
BEGIN;
INSERT INTO idempotency_keys (account_id, client_request_id, fingerprint, order_id, create_time, expire_time)
  VALUES ('bench', :k, '\x0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20', :o, now(), now() + interval '1 day')
  ON CONFLICT DO NOTHING;
INSERT INTO orders (order_id, account_id, client_request_id, symbol, side, order_type, quantity, limit_price,
                    time_in_force, status, create_time, update_time)
  VALUES (:o, 'bench', :k, 'AAPL', 'BUY', 'LIMIT', 10, 187.5, 'GTC', 'NEW', now(), now());
COMMIT;
