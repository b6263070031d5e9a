-- ListOrders filtered by symbol or by status, newest first, without a scan.
create index orders_by_account_symbol_time on orders (account_id, symbol, create_time, order_id);
create index orders_by_account_status_time on orders (account_id, status, create_time, order_id);
