//! The PlaceOrder transaction of DESIGN.md section 4, written once for every
//! engine: each engine supplies the four statements ([`PlaceTx`]) and runs
//! [`place`] inside its own transaction, committing on success.
//!
//! The unique key `(account_id, client_request_id)` is the guard: the key row
//! is inserted with `on conflict do nothing`, and the order only if it was. On Postgres (READ
//! COMMITTED) a racing duplicate's insert waits on the unique index until the
//! first transaction ends, so every duplicate resolves to the one order.

use std::{future::Future, time::Duration};

use super::Placement;
use crate::{
    domain::{AccountId, ClientRequestId, Fingerprint, NewOrder, Order, OrderId, Timestamp},
    error::Error,
};

/// A key row to write.
#[derive(Debug)]
pub(super) struct KeyRecord<'a> {
    pub account_id: &'a AccountId,
    pub client_request_id: ClientRequestId,
    pub fingerprint: Fingerprint,
    pub order_id: OrderId,
    pub create_time: Timestamp,
    pub expire_time: Timestamp,
}

impl<'a> KeyRecord<'a> {
    /// The key row of `new`, naming a freshly generated order id.
    fn new(account: &'a AccountId, new: &NewOrder, now: Timestamp, ttl: Duration) -> Self {
        KeyRecord {
            account_id: account,
            client_request_id: new.client_request_id,
            fingerprint: new.fingerprint(),
            order_id: OrderId::generate(),
            create_time: now,
            expire_time: now.add(ttl),
        }
    }
}

/// A key row as stored, with the order it names.
#[derive(Debug, Clone)]
pub(super) struct StoredKey {
    pub fingerprint: Vec<u8>,
    pub expire_time: Timestamp,
    pub order: Order,
}

/// The statements of the PlaceOrder transaction, on an open transaction.
pub(super) trait PlaceTx: Send {
    /// Inserts the key and its new `order` unless the key exists; true if it
    /// inserted both.
    fn insert_key_and_order(
        &mut self,
        key: &KeyRecord<'_>,
        order: &Order,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Reads the key row and the order it names, in one statement.
    fn read_key(
        &mut self,
        account: &AccountId,
        key: ClientRequestId,
    ) -> impl Future<Output = Result<Option<StoredKey>, Error>> + Send;

    /// Overwrites the key row if it expired at or before `key.create_time`;
    /// true if it did.
    fn replace_expired_key(
        &mut self,
        key: &KeyRecord<'_>,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Inserts a new order.
    fn insert_order(&mut self, order: &Order) -> impl Future<Output = Result<(), Error>> + Send;
}

/// Places `new` for `account` within `tx`: creates the order, replays the
/// order the live key points to, or refuses a key reused with other fields.
/// The caller commits when this returns `Ok`, and rolls back otherwise.
pub(super) async fn place(
    tx: &mut impl PlaceTx,
    account: &AccountId,
    new: NewOrder,
    now: Timestamp,
    ttl: Duration,
) -> Result<(Order, Placement), Error> {
    let record = KeyRecord::new(account, &new, now, ttl);
    let order = new.clone().into_order(account.clone(), record.order_id, now);
    // Another transaction can change the key between two statements only by
    // purging or replacing an expired row; each such change ends the next
    // round, so a few rounds always suffice.
    for _ in 0..3 {
        if tx.insert_key_and_order(&record, &order).await? {
            return Ok((order, Placement::Created));
        }
        let Some(stored) = tx.read_key(account, record.client_request_id).await? else {
            continue; // purged in between: insert again
        };
        if stored.expire_time > now {
            return answer_live(stored, &new).map(|order| (order, Placement::Replayed));
        }
        if tx.replace_expired_key(&record).await? {
            tx.insert_order(&order).await?;
            return Ok((order, Placement::ExpiredReuse));
        }
        // Another call replaced the expired key first: read it again.
    }
    Err(Error::internal("placing an order", "the idempotency key changed on every attempt"))
}

/// The steps of [`place`] that need no transaction around them: a new key
/// creates its order (one statement of `insert_key_and_order`, atomic on its
/// own where the engine makes it one), a live key is answered by [`replay`].
/// `None` when the key has expired: that takes [`place`] in a transaction.
pub(super) async fn place_new_or_live(
    conn: &mut impl PlaceTx,
    account: &AccountId,
    new: &NewOrder,
    now: Timestamp,
    ttl: Duration,
) -> Result<Option<(Order, Placement)>, Error> {
    let record = KeyRecord::new(account, new, now, ttl);
    let order = new.clone().into_order(account.clone(), record.order_id, now);
    if conn.insert_key_and_order(&record, &order).await? {
        return Ok(Some((order, Placement::Created)));
    }
    replay(conn.read_key(account, new.client_request_id).await?, new, now)
}

/// Answers from a stored key read beforehand (on a reader beside the writer,
/// or outside a transaction) when it is live: the persisted order if the
/// fingerprint matches, `KeyReused` if not; `None` when the key is new or
/// expired, and the write flow decides.
pub(super) fn replay(
    stored: Option<StoredKey>,
    new: &NewOrder,
    now: Timestamp,
) -> Result<Option<(Order, Placement)>, Error> {
    match stored {
        Some(stored) if stored.expire_time > now => {
            answer_live(stored, new).map(|order| Some((order, Placement::Replayed)))
        }
        _ => Ok(None),
    }
}

/// The order of a live key if `new` is the same request, else `KeyReused`.
fn answer_live(stored: StoredKey, new: &NewOrder) -> Result<Order, Error> {
    if stored.fingerprint == new.fingerprint().0 {
        return Ok(stored.order);
    }
    let mismatched = new.mismatched_fields(&stored.order);
    Err(Error::KeyReused { order_id: stored.order.order_id, mismatched })
}
