//! Who is calling: bearer tokens from a file of hashes, client certificates
//! under mutual TLS, or nobody (every caller is `anonymous`) when neither is
//! configured.
//!
//! Precedence: a call that carries `authorization: Bearer …` is the token's
//! account, and a bad token is refused even if the connection has a valid
//! client certificate. A call without a token is identified by its client
//! certificate: by the one field `--tls-client-identity` names (the URI SAN,
//! whole or under a prefix, the DNS SAN, or the CN), never falling back to
//! another; a certificate with none or several values there is refused. Tokens are never logged; the file holds only their
//! SHA-256, compared in constant time.
//!
//! Order calls are authenticated by [`AuthLayer`] from their headers and
//! connection alone, before tonic reads or decodes the message: an
//! unauthenticated caller is answered `UNAUTHENTICATED` having made the
//! server buffer no more than HTTP/2's flow-control window of its message.
//! Health and reflection stay open. A call carrying two `authorization`
//! headers is refused, and no token or certificate may claim the account
//! `anonymous`: that is the account of callers when authentication is off,
//! and it must not inherit their orders.

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status, codegen::http};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use crate::{config::CertIdentity, domain::AccountId, error::Error};

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
    /// How client certificates name accounts, under mutual TLS.
    client_certs: Option<CertIdentity>,
    /// How often a refused call is logged.
    refusals: crate::telemetry::Throttle,
}

/// Parses a token file: `ACCOUNT SHA256-HEX` per line; blank lines and `#`
/// comments are skipped. Errors name the line.
fn parse_token_file(text: &str) -> Result<Vec<Entry>, String> {
    let (entries, errors) = parse_token_lines(text);
    match errors.into_iter().next() {
        Some(error) => Err(error),
        None => Ok(entries),
    }
}

/// Parses every line it can: the entries of the good lines, and an error
/// naming each bad one (a bad line grants nothing).
fn parse_token_lines(text: &str) -> (Vec<Entry>, Vec<String>) {
    let mut entries: Vec<Entry> = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [account, hash] = fields[..] else {
            errors.push(format!("line {n}: expected `ACCOUNT SHA256-HEX`"));
            continue;
        };
        if let Err(why) = valid_account(account) {
            errors.push(format!("line {n}: account {why}"));
            continue;
        }
        let mut digest = [0u8; 32];
        if hex::decode_to_slice(hash, &mut digest).is_err() {
            errors.push(format!("line {n}: the hash must be 64 hex digits (the token's SHA-256)"));
            continue;
        }
        if entries.iter().any(|e| e.hash == digest) {
            errors.push(format!("line {n}: this token hash is listed twice"));
            continue;
        }
        entries.push(Entry { account: AccountId::new(account), hash: digest });
    }
    (entries, errors)
}

/// Checks a token file as the server would load it at start: every problem,
/// each naming its line. `order-service check-tokens FILE` runs this.
pub fn check_token_file(path: &Path) -> Result<usize, Vec<String>> {
    let text = read_text(path).map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    let (entries, errors) = parse_token_lines(&text);
    if errors.is_empty() { Ok(entries.len()) } else { Err(errors) }
}

fn valid_account(account: &str) -> Result<(), &'static str> {
    if account.eq_ignore_ascii_case(AccountId::anonymous().as_str()) {
        Err("`anonymous` is reserved for callers when authentication is off")
    } else if account.is_empty() || account.len() > MAX_ACCOUNT_LEN {
        Err("must be 1 to 256 characters")
    } else if !account.bytes().all(|b| b.is_ascii_graphic()) {
        Err("must be printable ASCII without spaces")
    } else {
        Ok(())
    }
}

/// A tokens file's text.
fn read_text(path: &Path) -> std::io::Result<String> {
    let bytes = crate::config::read_flag_file(path)?;
    String::from_utf8(bytes).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

fn load(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = read_text(path).with_context(|| format!("cannot read auth tokens file {}", path.display()))?;
    parse_token_file(&text).map_err(|why| anyhow::anyhow!("auth tokens file {}: {why}", path.display()))
}

impl Authenticator {
    /// Loads the token file, if any; `client_certs` says whether (and by
    /// which field) mutual TLS identifies callers.
    pub fn new(tokens_file: Option<&Path>, client_certs: Option<CertIdentity>) -> anyhow::Result<Self> {
        let tokens = match tokens_file {
            Some(path) => {
                let entries = load(path)?;
                Some(TokenFile { path: path.to_owned(), entries: RwLock::new(Arc::new(entries)) })
            }
            None => None,
        };
        Ok(Self { tokens, client_certs, refusals: Default::default() })
    }

    /// Every caller is `anonymous`.
    pub fn anonymous() -> Self {
        Self { tokens: None, client_certs: None, refusals: Default::default() }
    }

    /// The token file's path, if tokens are configured.
    pub fn tokens_file(&self) -> Option<&Path> {
        self.tokens.as_ref().map(|t| t.path.as_path())
    }

    /// Reads the token file again and replaces every token with what it now
    /// lists. It fails closed: a bad line grants nothing (the others apply,
    /// and each bad one is reported), and a file that cannot be read leaves
    /// no token valid, so a token removed from the file is never accepted
    /// again, whatever else is wrong with it. (A passing fault, such as
    /// running out of descriptors, says nothing about the file: the tokens
    /// in force stay.) Returns how many tokens are now accepted, and the
    /// problems.
    pub fn reload(&self) -> (usize, Vec<String>) {
        let Some(tokens) = &self.tokens else {
            return (0, Vec::new());
        };
        let (entries, errors) = match read_text(&tokens.path) {
            Ok(text) => parse_token_lines(&text),
            // Out of descriptors, say: the file has not changed, and a
            // passing fault is not a revocation. The tokens in force stay.
            Err(error) if crate::config::is_transient(&error) => {
                let count = tokens.entries.read().unwrap_or_else(|e| e.into_inner()).len();
                let problem =
                    format!("cannot read {} now ({error}): the tokens in force stay", tokens.path.display());
                return (count, vec![problem]);
            }
            Err(error) => (Vec::new(), vec![format!("cannot read {}: {error}", tokens.path.display())]),
        };
        let count = entries.len();
        // A poisoned lock only means a panic elsewhere while swapping an Arc.
        *tokens.entries.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(entries);
        (count, errors)
    }

    /// The account of this call: the one [`AuthLayer`] found, else found now.
    pub fn authenticate<T>(&self, request: &Request<T>) -> Result<AccountId, Error> {
        if let Some(Authenticated(account)) = request.extensions().get::<Authenticated>() {
            return Ok(account.clone());
        }
        self.authenticate_parts(request.metadata().as_ref(), request.extensions())
    }

    /// The account a call's headers and connection name, or `UNAUTHENTICATED`.
    pub fn authenticate_parts(
        &self,
        headers: &http::HeaderMap,
        extensions: &http::Extensions,
    ) -> Result<AccountId, Error> {
        let mut headers = headers.get_all("authorization").iter();
        let header = headers.next();
        if headers.next().is_some() {
            return Err(Error::Unauthenticated("more than one authorization header"));
        }
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
        if let Some(field) = &self.client_certs {
            let peer_certs = extensions.get::<super::PeerInfo>().and_then(|peer| peer.certs.clone());
            if let Some(cert) = peer_certs.as_ref().and_then(|certs| certs.first()) {
                return identity(cert, field).map_err(Error::Unauthenticated);
            }
        }
        match (&self.tokens, &self.client_certs) {
            (None, None) => Ok(AccountId::anonymous()),
            (Some(_), _) => {
                Err(Error::Unauthenticated("missing credentials: send `authorization: Bearer TOKEN`"))
            }
            (None, Some(_)) => {
                Err(Error::Unauthenticated("missing credentials: present a client certificate"))
            }
        }
    }
}

/// Authenticates an order call ahead of [`AuthLayer`] (which then trusts
/// what this left in its extensions): true for a call that will not be
/// refused for its credentials, or that is not an order call.
pub fn preauthenticate<B>(auth: &Authenticator, request: &mut http::Request<B>) -> bool {
    if !request.uri().path().starts_with(ORDER_SERVICE_PATH) {
        return true;
    }
    match auth.authenticate_parts(request.headers(), request.extensions()) {
        Ok(account) => {
            request.extensions_mut().insert(Authenticated(account));
            true
        }
        Err(_) => false,
    }
}

/// The account [`AuthLayer`] found for a call, in its extensions.
#[derive(Debug, Clone)]
pub struct Authenticated(pub AccountId);

/// The gRPC path prefix of the calls that need credentials.
pub const ORDER_SERVICE_PATH: &str = "/orders.v1.OrderService/";

/// Wraps a service in [`Authenticate`].
#[derive(Debug, Clone)]
pub struct AuthLayer(pub Arc<Authenticator>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticate { inner, auth: self.0.clone() }
    }
}

/// A service whose order calls are authenticated before their message is
/// read (see the module doc).
#[derive(Debug, Clone)]
pub struct Authenticate<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        // Authenticated already (by `preauthenticate`, for its trace).
        if path.starts_with(ORDER_SERVICE_PATH) && request.extensions().get::<Authenticated>().is_none() {
            match self.auth.authenticate_parts(request.headers(), request.extensions()) {
                Ok(account) => {
                    request.extensions_mut().insert(Authenticated(account));
                }
                Err(error) => {
                    let method = path.strip_prefix(ORDER_SERVICE_PATH).unwrap_or_default();
                    if method == "PlaceOrder" {
                        crate::telemetry::metrics::record_place_outcome("unauthenticated");
                    }
                    // Counted always (grpc_server_handled_total); logged
                    // at a bounded rate: a caller with no credentials must
                    // not be able to make the server write without end.
                    if let Some(left_out) = self.auth.refusals.admit() {
                        if left_out > 0 {
                            tracing::info!(
                                suppressed = left_out,
                                "more calls were refused before reading their message (not logged one by one)"
                            );
                        }
                        tracing::info!(
                            method = crate::api::loggable(method),
                            outcome = "unauthenticated",
                            %error,
                            "refused a call before reading its message"
                        );
                    }
                    let response: http::Response<R> = Status::from(error).into_http();
                    return Box::pin(std::future::ready(Ok(response)));
                }
            }
        }
        Box::pin(self.inner.call(request))
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

/// The account a client certificate names in `field`: exactly one value
/// there, and no other field looked at.
fn identity(der: &[u8], field: &CertIdentity) -> Result<AccountId, &'static str> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|_| "the client certificate cannot be read")?;
    let names = cert.subject_alternative_name().ok().flatten().map(|san| san.value.general_names.clone());
    let names = names.unwrap_or_default();
    let uris = || names.iter().filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None });
    let candidates: Vec<&str> = match field {
        CertIdentity::Uri => uris().collect(),
        // Every URI SAN is a candidate: one outside the prefix is not
        // ignored, it makes the certificate ambiguous.
        CertIdentity::UriPrefix(prefix) => {
            let all: Vec<&str> = uris().collect();
            match all[..] {
                [one] => vec![one.strip_prefix(prefix.as_str()).ok_or(
                    "the client certificate's URI SAN is not under the --tls-client-identity prefix",
                )?],
                _ => all,
            }
        }
        CertIdentity::Dns => names
            .iter()
            .filter_map(|n| if let GeneralName::DNSName(d) = n { Some(*d) } else { None })
            .collect(),
        CertIdentity::Cn => {
            let cns: Option<Vec<&str>> =
                cert.subject().iter_common_name().map(|cn| cn.as_str().ok()).collect();
            cns.ok_or("the client certificate's CN cannot be read")?
        }
    };
    match candidates[..] {
        [] => Err("the client certificate names no identity in the field --tls-client-identity names"),
        [one] => {
            valid_account(one).map_err(|_| "the client certificate's identity is not a valid account")?;
            Ok(AccountId::new(one))
        }
        _ => Err("the client certificate names several identities in the field --tls-client-identity names"),
    }
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

    /// `anonymous` is the account of every caller while authentication is
    /// off: no token or certificate may claim it and inherit those orders.
    #[test]
    fn anonymous_is_reserved() {
        let line = format!("anonymous {}", "a".repeat(64));
        assert!(parse_token_file(&line).unwrap_err().contains("reserved"));
        assert!(new_token("anonymous").is_err());
        assert!(valid_account("anonymous").is_err() && valid_account("anonymous2").is_ok());
        assert!(valid_account("Anonymous").is_err() && valid_account("ANONYMOUS").is_err());
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
