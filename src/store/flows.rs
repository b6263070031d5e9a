//! GetOrder, ListOrders, CancelOrder and the purge, written once for every
//! engine, as PlaceOrder is in `place`: each engine supplies the statements
//! ([`Statements`]), and the flows decide what to run and what it means.
//! Adding a column touches each engine's migration and statements, never a
//! flow.

use std::future::Future;

use sqlx::{Database, Encode, QueryBuilder, Type};

use crate::{
    domain::{AccountId, ClientRequestId, Cursor, Order, OrderFilter, OrderId},
    error::Error,
};

/// One engine's statements behind the flows. Every time they compare with
/// is the engine's clock when the statement runs.
pub(super) trait Statements: Sync {
    /// The account's order with this id.
    fn order_by_id(
        &self,
        account: &AccountId,
        id: OrderId,
    ) -> impl Future<Output = Result<Option<Order>, Error>> + Send;

    /// The order the account's key names, while the key is live.
    fn order_of_live_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> impl Future<Output = Result<Option<Order>, Error>> + Send;

    /// The newest of the account's orders placed with the key.
    fn newest_order_of_key(
        &self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> impl Future<Output = Result<Option<Order>, Error>> + Send;

    /// A page of the account's orders, as [`page_query`] selects them.
    fn orders_page(
        &self,
        account: &AccountId,
        filter: &OrderFilter,
        after: Option<Cursor>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Order>, Error>> + Send;

    /// Cancels the account's order if it is `NEW`, in one statement (a
    /// concurrent cancel waits on the row, then finds it changed): the
    /// cancelled order, or `None` if no `NEW` order of the account matched.
    fn cancel_if_new(
        &self,
        account: &AccountId,
        id: OrderId,
    ) -> impl Future<Output = Result<Option<Order>, Error>> + Send;

    /// Deletes at most `limit` expired keys, oldest expiry first; how many.
    fn delete_expired_keys(&self, limit: u32) -> impl Future<Output = Result<u64, Error>> + Send;
}

/// The account's order with this id; `NotFound` if it has none.
pub(super) async fn get_order(s: &impl Statements, account: &AccountId, id: OrderId) -> Result<Order, Error> {
    s.order_by_id(account, id).await?.ok_or(Error::NotFound)
}

/// The order the account's live key names; once the key has expired or
/// been purged, the newest of the account's orders placed with it.
pub(super) async fn get_order_by_key(
    s: &impl Statements,
    account: &AccountId,
    key: ClientRequestId,
) -> Result<Order, Error> {
    if let Some(order) = s.order_of_live_key(account, key).await? {
        return Ok(order);
    }
    s.newest_order_of_key(account, key).await?.ok_or(Error::NotFound)
}

/// Cancels the account's order if it is `NEW`: the order as it now is, and
/// whether this call changed it. An order already cancelled is answered as
/// it is; `NotFound` if the account has no such order.
pub(super) async fn cancel_order(
    s: &impl Statements,
    account: &AccountId,
    id: OrderId,
) -> Result<(Order, bool), Error> {
    match s.cancel_if_new(account, id).await? {
        Some(order) => Ok((order, true)),
        None => Ok((get_order(s, account, id).await?, false)),
    }
}

/// Appends ListOrders' conditions to `query`, which ends in
/// `… from orders where account_id = `: the account, the filter's symbol
/// and status, the page's cursor (`(create_time, order_id)` below it), newest
/// first, at most `limit`. Every value is bound; `after` is the cursor as
/// the engine stores it.
pub(super) fn page_query<DB, T, I>(
    query: &mut QueryBuilder<DB>,
    account: &AccountId,
    filter: &OrderFilter,
    after: Option<(T, I)>,
    limit: u32,
) where
    DB: Database,
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> &'static str: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
    for<'t> T: Encode<'t, DB> + Type<DB>,
    for<'t> I: Encode<'t, DB> + Type<DB>,
{
    query.push_bind(account.as_str().to_owned());
    if let Some(symbol) = &filter.symbol {
        query.push(" and symbol = ").push_bind(symbol.as_str().to_owned());
    }
    if let Some(status) = filter.status {
        query.push(" and status = ").push_bind(status.as_str());
    }
    if let Some((time, id)) = after {
        query.push(" and (create_time, order_id) < (").push_bind(time).push(", ").push_bind(id).push(")");
    }
    query.push(" order by create_time desc, order_id desc limit ").push_bind(i64::from(limit));
}
