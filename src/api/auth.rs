//! Who is calling: bearer tokens from a file of hashes, client certificates
//! under mutual TLS, or nobody (every caller is `anonymous`) when neither is
//! configured.
//!
//! Precedence: a call that carries `authorization: Bearer …` is the token's
//! account, and a bad token is refused even if the connection has a valid
//! client certificate. A call without a token is identified by its client
//! certificate: the first URI SAN (e.g. a SPIFFE ID), else the first DNS SAN,
//! else the subject CN. Tokens are never logged; the file holds only their
//! SHA-256, compared in constant time.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Request;
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{domain::AccountId, error::Error};

/// The longest account id accepted from a token file or a certificate.
const MAX_ACCOUNT_LEN: usize = 256;

/// One accepted token: its account and SHA-256.
#[derive(Clone)]
struct Entry {
    account: AccountId,
    hash: [u8; 32],
}

/// Tokens loaded from `--auth-tokens-file`, replaced whole on reload.
#[derive(Debug)]
struct TokenFile {
    path: PathBuf,
    entries: RwLock<Arc<Vec<Entry>>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("account", &self.account).finish_non_exhaustive()
    }
}

/// Decides the account of each call.
#[derive(Debug)]
pub struct Authenticator {
    tokens: Option<TokenFile>,
    client_certs: bool,
}

/// Parses a token file: `ACCOUNT SHA256-HEX` per line; blank lines and `#`
/// comments are skipped. Errors name the line.
fn parse_token_file(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries: Vec<Entry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [account, hash] = fields[..] else {
            return Err(format!("line {n}: expected `ACCOUNT SHA256-HEX`"));
        };
        valid_account(account).map_err(|why| format!("line {n}: account {why}"))?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hash, &mut digest)
            .map_err(|_| format!("line {n}: the hash must be 64 hex digits (the token's SHA-256)"))?;
        if entries.iter().any(|e| e.hash == digest) {
            return Err(format!("line {n}: this token hash is listed twice"));
        }
        entries.push(Entry { account: AccountId::new(account), hash: digest });
    }
    Ok(entries)
}

fn valid_account(account: &str) -> Result<(), &'static str> {
    if account.is_empty() || account.len() > MAX_ACCOUNT_LEN {
        Err("must be 1 to 256 characters")
    } else if !account.bytes().all(|b| b.is_ascii_graphic()) {
        Err("must be printable ASCII without spaces")
    } else {
        Ok(())
    }
}

fn load(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read auth tokens file {}", path.display()))?;
    parse_token_file(&text).map_err(|why| anyhow::anyhow!("auth tokens file {}: {why}", path.display()))
}

impl Authenticator {
    /// Loads the token file, if any; `client_certs` says whether mutual TLS
    /// identifies callers.
    pub fn new(tokens_file: Option<&Path>, client_certs: bool) -> anyhow::Result<Self> {
        let tokens = match tokens_file {
            Some(path) => {
                let entries = load(path)?;
                Some(TokenFile { path: path.to_owned(), entries: RwLock::new(Arc::new(entries)) })
            }
            None => None,
        };
        Ok(Self { tokens, client_certs })
    }

    /// Every caller is `anonymous`.
    pub fn anonymous() -> Self {
        Self { tokens: None, client_certs: false }
    }

    /// Reads the token file again; on error the old tokens stay in force.
    /// Returns how many tokens are now accepted.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let Some(tokens) = &self.tokens else {
            return Ok(0);
        };
        let entries = load(&tokens.path)?;
        let count = entries.len();
        // A poisoned lock only means a panic elsewhere while swapping an Arc.
        *tokens.entries.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entries);
        Ok(count)
    }

    /// The account of this call, or `UNAUTHENTICATED`.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<AccountId, Error> {
        let header = request.metadata().get("authorization");
        if let (Some(tokens), Some(header)) = (&self.tokens, header) {
            let token = header
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or(Error::Unauthenticated("the authorization header must be `Bearer TOKEN`"))?;
            return tokens.account_of(token).ok_or(Error::Unauthenticated("unknown or revoked token"));
        }
        if self.client_certs
            && let Some(account) =
                request.peer_certs().and_then(|certs| certs.first().and_then(|c| identity(c)))
        {
            return Ok(account);
        }
        match (&self.tokens, self.client_certs) {
            (None, false) => Ok(AccountId::anonymous()),
            (Some(_), _) => {
                Err(Error::Unauthenticated("missing credentials: send `authorization: Bearer TOKEN`"))
            }
            (None, true) => Err(Error::Unauthenticated("the client certificate names no identity")),
        }
    }
}

impl TokenFile {
    /// The account of `token`, comparing its hash with every entry in
    /// constant time.
    fn account_of(&self, token: &str) -> Option<AccountId> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut found = None;
        for entry in entries.iter() {
            if bool::from(entry.hash.ct_eq(&hash)) {
                found = Some(entry.account.clone());
            }
        }
        found
    }
}

/// The identity a client certificate names: first URI SAN, else first DNS
/// SAN, else subject CN.
fn identity(der: &[u8]) -> Option<AccountId> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let names = cert.subject_alternative_name().ok().flatten().map(|san| san.value.general_names.clone());
    let names = names.unwrap_or_default();
    let uri = names.iter().find_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None });
    let dns = names.iter().find_map(|n| if let GeneralName::DNSName(d) = n { Some(*d) } else { None });
    let cn = || cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
    let id = uri.or(dns).or_else(cn)?;
    valid_account(id).ok()?;
    Some(AccountId::new(id))
}

/// A fresh random token and its token-file line for `account`.
pub fn new_token(account: &str) -> anyhow::Result<(String, String)> {
    valid_account(account).map_err(|why| anyhow::anyhow!("account {why}"))?;
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token = format!("ost_{}", hex::encode(bytes));
    let line = format!("{account} {}", hex::encode(Sha256::digest(token.as_bytes())));
    Ok((token, line))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_parse_with_comments_and_name_bad_lines() {
        let hash = "a".repeat(64);
        let text =
            format!("# accounts\n\ncheckout {hash}  # the checkout service\nbilling {}\n", "b".repeat(64));
        let entries = parse_token_file(&text).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].account.as_str(), "checkout");
        for (bad, line) in [
            ("checkout\n".to_owned(), "line 1"),
            ("# c\ncheckout zz\n".to_owned(), "line 2"),
            (format!("checkout {hash} extra\n"), "line 1"),
            (format!("a {hash}\nb {hash}\n"), "line 2"),
        ] {
            let err = parse_token_file(&bad).unwrap_err();
            assert!(err.starts_with(line), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_new_token_matches_its_line() {
        let (token, line) = new_token("checkout").unwrap();
        let entries = parse_token_file(&line).unwrap();
        let file = TokenFile { path: PathBuf::new(), entries: RwLock::new(Arc::new(entries)) };
        assert_eq!(file.account_of(&token).unwrap().as_str(), "checkout");
        assert!(file.account_of("ost_wrong").is_none());
        assert!(new_token("has space").is_err());
    }
}
