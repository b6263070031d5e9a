//! `ListOrders` page tokens (AIP-158): opaque to callers, they carry the
//! position after which the next page starts, and are bound to the account
//! and the filters they were issued for.
//!
//! Layout (then hex-encoded): version byte, `create_time` (i64, big-endian
//! microseconds), `order_id` (16 bytes), and the first 8 bytes of a SHA-256
//! over the position, the account and the filters. A token that was altered,
//! or is reused with other filters or by another account, fails that check.
//! The check is not a secret MAC: a caller who forges a token can only choose
//! where to start listing their own orders.

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::domain::{AccountId, Cursor, OrderFilter, OrderId, Timestamp};

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 16 + 8;

fn check(account: &AccountId, filter: &OrderFilter, position: &[u8]) -> [u8; 8] {
    let mut hasher = Sha256::new();
    hasher.update(b"orders.v1.ListOrders/page-token/1");
    let symbol = filter.symbol.as_ref().map_or("", |s| s.as_str());
    let status = filter.status.map_or("", |s| s.as_str());
    for part in [account.as_str().as_bytes(), symbol.as_bytes(), status.as_bytes(), position] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The token for the page after `cursor`.
pub fn encode(account: &AccountId, filter: &OrderFilter, cursor: Cursor) -> String {
    let mut bytes = Vec::with_capacity(LEN);
    bytes.push(VERSION);
    bytes.extend_from_slice(&cursor.create_time.as_micros().to_be_bytes());
    bytes.extend_from_slice(cursor.order_id.uuid().as_bytes());
    let check = check(account, filter, &bytes[1..]);
    bytes.extend_from_slice(&check);
    hex::encode(bytes)
}

/// The position a token carries, if it was issued for this account and
/// these filters; else a sentence for the caller.
pub fn decode(token: &str, account: &AccountId, filter: &OrderFilter) -> Result<Cursor, String> {
    const INVALID: &str = "is not a page token issued for this request: pass next_page_token unchanged, \
                           with the same symbol and status filters";
    let bytes = hex::decode(token).map_err(|_| INVALID.to_owned())?;
    if bytes.len() != LEN || bytes[0] != VERSION {
        return Err(INVALID.to_owned());
    }
    let (position, given) = bytes[1..].split_at(8 + 16);
    if check(account, filter, position) != given {
        return Err(INVALID.to_owned());
    }
    let (time, id) = position.split_at(8);
    let micros = i64::from_be_bytes(time.try_into().map_err(|_| INVALID.to_owned())?);
    let id = Uuid::from_slice(id).map_err(|_| INVALID.to_owned())?;
    Ok(Cursor { create_time: Timestamp::from_micros(micros), order_id: OrderId::from_uuid(id) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderStatus, Symbol};

    fn cursor() -> Cursor {
        Cursor { create_time: Timestamp::from_micros(1_700_000_000_123_456), order_id: OrderId::generate() }
    }

    #[test]
    fn a_token_round_trips_for_its_own_request() {
        let account = AccountId::anonymous();
        let filter =
            OrderFilter { symbol: Some(Symbol::parse("AAPL").unwrap()), status: Some(OrderStatus::New) };
        let c = cursor();
        assert_eq!(decode(&encode(&account, &filter, c), &account, &filter), Ok(c));
    }

    #[test]
    fn a_token_is_refused_with_other_filters_another_account_or_altered() {
        let account = AccountId::anonymous();
        let filter = OrderFilter::default();
        let token = encode(&account, &filter, cursor());
        let aapl = OrderFilter { symbol: Some(Symbol::parse("AAPL").unwrap()), status: None };
        let canceled = OrderFilter { symbol: None, status: Some(OrderStatus::Canceled) };
        assert!(decode(&token, &account, &aapl).is_err());
        assert!(decode(&token, &account, &canceled).is_err());
        assert!(decode(&token, &AccountId::new("other"), &filter).is_err());
        for i in 0..token.len() {
            let mut altered = token.clone().into_bytes();
            altered[i] = if altered[i] == b'0' { b'1' } else { b'0' };
            let altered = String::from_utf8(altered).unwrap();
            assert!(decode(&altered, &account, &filter).is_err(), "accepted a change at {i}");
        }
        for bad in ["", "zz", &token[..token.len() - 2], &format!("{token}00")] {
            assert!(decode(bad, &account, &filter).is_err(), "accepted {bad:?}");
        }
    }
}
