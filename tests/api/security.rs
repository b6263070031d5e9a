//! Who may call and what each caller sees: bearer tokens, mutual TLS,
//! account isolation, safe defaults and request limits.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use order_service::proto::{
    CancelOrderRequest, GetOrderRequest, ListOrdersRequest, OrderStatus, get_order_request::Lookup,
    order_service_client::OrderServiceClient,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use tempfile::TempDir;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    helpers::process::{BIN, ServerProcess},
    helpers::{
        Engine, TestApp, channel, closed_by_server, engine_tests, limit_order, new_key, raw_h2,
        spawn_app_with,
    },
};

/// Two accounts' tokens and a token file naming them.
struct Tokens {
    dir: TempDir,
    alice: String,
    bob: String,
}

impl Tokens {
    fn new() -> Tokens {
        let dir = tempfile::tempdir().unwrap();
        let (alice, alice_line) = order_service::api::new_token("alice").unwrap();
        let (bob, bob_line) = order_service::api::new_token("bob").unwrap();
        std::fs::write(dir.path().join("tokens"), format!("# test accounts\n{alice_line}\n{bob_line}\n"))
            .unwrap();
        Tokens { dir, alice, bob }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }
}

/// Replaces `path` with `text` at once (a rename), as a tokens file should
/// be replaced: the server, which rereads it when it changes, never sees it
/// half-written.
fn write_atomically(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// `message` with `authorization: Bearer token`.
fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn spawn_with_tokens(engine: Engine, tokens: &Tokens) -> TestApp {
    let file = tokens.file();
    spawn_app_with(engine, |c| c.auth_tokens_file = Some(file)).await
}

async fn calls_without_a_valid_token_are_unauthenticated_and_write_nothing(engine: Engine) {
    let tokens = Tokens::new();
    let mut app = spawn_with_tokens(engine, &tokens).await;
    let key = new_key();
    let header = |value: &str| {
        let mut request = Request::new(limit_order(&key));
        request.metadata_mut().insert("authorization", value.parse().unwrap());
        request
    };
    let cases = [
        ("no token", Request::new(limit_order(&key))),
        ("basic auth", header("Basic YWxpY2U6c2VjcmV0")),
        ("empty bearer", header("Bearer ")),
        ("unknown token", header("Bearer ost_0000")),
        ("another account's hash as a token", header(&format!("Bearer {}", &tokens.alice[..20]))),
    ];
    for (name, request) in cases {
        let status = app.client.place_order(request).await.expect_err(name);
        assert_eq!(status.code(), Code::Unauthenticated, "{name}: {status:?}");
        assert!(!status.message().contains("ost_"), "{name}: the token is not echoed");
    }
    let get = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(key.clone())) };
    assert_eq!(app.client.get_order(get).await.unwrap_err().code(), Code::Unauthenticated);
    let list = ListOrdersRequest::default();
    assert_eq!(app.client.list_orders(list).await.unwrap_err().code(), Code::Unauthenticated);
    let cancel = CancelOrderRequest { order_id: uuid::Uuid::now_v7().to_string() };
    assert_eq!(app.client.cancel_order(cancel).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(app.count("orders").await, 0);

    let placed = app.client.place_order(bearer(limit_order(&key), &tokens.alice)).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "alice");
}

async fn two_accounts_using_one_key_get_two_orders_and_never_see_each_others(engine: Engine) {
    let tokens = Tokens::new();
    let mut app = spawn_with_tokens(engine, &tokens).await;
    let key = new_key();
    let place = |token: &str| bearer(limit_order(&key), token);
    let alices = app.client.place_order(place(&tokens.alice)).await.unwrap().into_inner();
    let bobs = app.client.place_order(place(&tokens.bob)).await.unwrap().into_inner();
    assert!(!alices.replayed && !bobs.replayed, "the key is scoped to each account");
    let (alices, bobs) = (alices.order.unwrap(), bobs.order.unwrap());
    assert_ne!(alices.order_id, bobs.order_id);
    assert_eq!((alices.account_id.as_str(), bobs.account_id.as_str()), ("alice", "bob"));

    // Bob cannot get, list or cancel Alice's order: it does not exist for him.
    let by_id = GetOrderRequest { lookup: Some(Lookup::OrderId(alices.order_id.clone())) };
    let status = app.client.get_order(bearer(by_id, &tokens.bob)).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::NotFound, "order not found"));
    let by_key = GetOrderRequest { lookup: Some(Lookup::ClientRequestId(key.clone())) };
    let found = app.client.get_order(bearer(by_key, &tokens.bob)).await.unwrap().into_inner();
    assert_eq!(found.order_id, bobs.order_id, "the key finds his own order");
    let listed = app.client.list_orders(bearer(ListOrdersRequest::default(), &tokens.bob)).await.unwrap();
    let listed: Vec<_> = listed.into_inner().orders.into_iter().map(|o| o.order_id).collect();
    assert_eq!(listed, std::slice::from_ref(&bobs.order_id));
    let cancel = CancelOrderRequest { order_id: alices.order_id.clone() };
    let status = app.client.cancel_order(bearer(cancel, &tokens.bob)).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let by_id = GetOrderRequest { lookup: Some(Lookup::OrderId(alices.order_id.clone())) };
    let still = app.client.get_order(bearer(by_id, &tokens.alice)).await.unwrap().into_inner();
    assert_eq!(still.status, OrderStatus::New as i32, "Bob's cancel changed nothing");
    assert_eq!(app.count("orders").await, 2);
}

async fn health_and_reflection_need_no_credentials(engine: Engine) {
    let tokens = Tokens::new();
    let app = spawn_with_tokens(engine, &tokens).await;
    let mut health = HealthClient::new(channel(app.addr).await);
    let status = health.check(HealthCheckRequest { service: "orders.v1.OrderService".into() }).await.unwrap();
    assert_eq!(status.into_inner().status, 1, "SERVING");
    let mut reflection = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
        channel(app.addr).await,
    );
    let list = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut answers =
        reflection.server_reflection_info(tokio_stream::iter([list])).await.unwrap().into_inner();
    assert!(answers.message().await.unwrap().is_some());
}

async fn an_oversized_request_is_refused_and_the_server_keeps_serving(engine: Engine) {
    let mut app = spawn_app_with(engine, |c| c.max_request_size = 64 * 1024).await;
    let mut huge = limit_order(&new_key());
    huge.symbol = "A".repeat(100 * 1024);
    let status = app.client.place_order(huge).await.expect_err("too large");
    // tonic refuses a message over the limit from its length prefix, with OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    let ok = app.place(limit_order(&new_key())).await;
    assert!(!ok.replayed, "the same connection keeps serving");
    assert_eq!(app.count("orders").await, 1);
}

/// A throwaway CA with a server certificate for localhost and 127.0.0.1,
/// and client certificates naming callers in different ways.
struct Pki {
    dir: TempDir,
    ca_pem: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "order-service test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pki = Pki { dir, ca_pem: ca.pem() };
        std::fs::write(pki.path("ca.pem"), &pki.ca_pem).unwrap();
        let (cert, key) = Pki::leaf(
            &ca,
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ],
            "localhost",
        );
        std::fs::write(pki.path("server.pem"), cert).unwrap();
        std::fs::write(pki.path("server.key"), key).unwrap();
        for (name, sans, cn) in [
            (
                "spiffe",
                vec![
                    SanType::DnsName("ignored.internal".try_into().unwrap()),
                    SanType::URI("spiffe://example.test/ns/prod/sa/checkout".try_into().unwrap()),
                ],
                "ignored-cn",
            ),
            ("dns", vec![SanType::DnsName("billing.internal".try_into().unwrap())], "ignored-cn"),
            ("cn", vec![], "reporting"),
            (
                "two-uris",
                vec![
                    SanType::URI("spiffe://example.test/ns/prod/sa/dave".try_into().unwrap()),
                    SanType::URI("spiffe://example.test/ns/prod/sa/eve".try_into().unwrap()),
                ],
                "dave",
            ),
        ] {
            let (cert, key) = Pki::leaf(&ca, sans, cn);
            std::fs::write(pki.path(&format!("{name}.pem")), cert).unwrap();
            std::fs::write(pki.path(&format!("{name}.key")), key).unwrap();
        }
        // A subject with two CNs (`CN=dave/CN=eve`).
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, "dave");
        params.distinguished_name.push(DnType::CustomDnType(vec![2, 5, 4, 3]), "eve");
        std::fs::write(pki.path("two-cns.pem"), params.signed_by(&key, &ca).unwrap().pem()).unwrap();
        std::fs::write(pki.path("two-cns.key"), key.serialize_pem()).unwrap();
        pki
    }

    fn leaf(ca: &CertifiedIssuer<'_, KeyPair>, sans: Vec<SanType>, cn: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, ca).unwrap().pem(), key.serialize_pem())
    }

    /// Has the server speak TLS with the certificate for localhost.
    fn serve_tls(&self, config: &mut order_service::config::Config) {
        config.tls_cert = Some(self.path("server.pem"));
        config.tls_key = Some(self.path("server.key"));
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An order client over TLS, presenting the client certificate `name`
    /// if given.
    async fn client(
        &self,
        addr: SocketAddr,
        name: Option<&str>,
    ) -> Result<OrderServiceClient<Channel>, tonic::transport::Error> {
        Ok(OrderServiceClient::new(self.channel(addr, name).await?))
    }

    /// A TLS channel, presenting the client certificate `name` if given.
    async fn channel(
        &self,
        addr: SocketAddr,
        name: Option<&str>,
    ) -> Result<Channel, tonic::transport::Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost");
        if let Some(name) = name {
            let cert = std::fs::read(self.path(&format!("{name}.pem"))).unwrap();
            let key = std::fs::read(self.path(&format!("{name}.key"))).unwrap();
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }
}

async fn mutual_tls_names_the_caller_by_its_certificate_and_refuses_order_calls_without_one(engine: Engine) {
    let pki = Pki::new();
    let tokens = Tokens::new();
    let file = tokens.file();
    let app = spawn_app_with(engine, |c| {
        pki.serve_tls(c);
        c.tls_client_ca = Some(pki.path("ca.pem"));
        c.auth_tokens_file = Some(file);
    })
    .await;

    // By default the URI SAN names the account, and nothing else does.
    let mut client = pki.client(app.addr, Some("spiffe")).await.unwrap();
    let placed = client.place_order(limit_order(&new_key())).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "spiffe://example.test/ns/prod/sa/checkout");
    for cert in ["dns", "cn"] {
        let mut client = pki.client(app.addr, Some(cert)).await.unwrap();
        let status = client.place_order(limit_order(&new_key())).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{cert}: no fallback to another field");
    }

    // A token, when present, names the caller: it takes precedence.
    let mut client = pki.client(app.addr, Some("spiffe")).await.unwrap();
    let placed = client.place_order(bearer(limit_order(&new_key()), &tokens.bob)).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "bob");
    let status = client.place_order(bearer(limit_order(&new_key()), "ost_bad")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "a bad token is not rescued by the certificate");

    // Without a client certificate (or token) the order RPCs are refused,
    // while health stays callable for probes.
    let mut anonymous = pki.client(app.addr, None).await.unwrap();
    let status = anonymous.place_order(limit_order(&new_key())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut health = HealthClient::new(pki.channel(app.addr, None).await.unwrap());
    let serving = health.check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(serving.into_inner().status, 1, "SERVING");
    // A certificate from another CA fails the handshake.
    let rogue = Pki::new();
    std::fs::copy(rogue.path("spiffe.pem"), pki.path("rogue.pem")).unwrap();
    std::fs::copy(rogue.path("spiffe.key"), pki.path("rogue.key")).unwrap();
    let refused = match pki.client(app.addr, Some("rogue")).await {
        Err(_) => true,
        Ok(mut client) => client.place_order(limit_order(&new_key())).await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA is refused");
    // Plain text is refused too.
    let mut plain =
        OrderServiceClient::new(Channel::from_shared(format!("http://{}", app.addr)).unwrap().connect_lazy());
    assert!(plain.place_order(limit_order(&new_key())).await.is_err());
    assert_eq!(app.count("orders").await, 2);
}

/// `--tls-client-identity` names one field of the certificate: the account
/// is its one value there; a certificate with several is refused.
#[tokio::test]
async fn one_certificate_field_names_the_account_and_several_values_are_refused() {
    let pki = Pki::new();
    let cases: [(&str, &str, Option<&str>); 8] = [
        ("uri", "spiffe", Some("spiffe://example.test/ns/prod/sa/checkout")),
        ("uri", "two-uris", None),
        ("uri-prefix:spiffe://example.test/ns/prod/sa/", "spiffe", Some("checkout")),
        ("uri-prefix:spiffe://example.test/ns/staging/sa/", "spiffe", None),
        ("dns", "dns", Some("billing.internal")),
        ("dns", "cn", None),
        ("cn", "cn", Some("reporting")),
        ("cn", "two-cns", None),
    ];
    for (field, cert, account) in cases {
        let app = spawn_app_with(Engine::Sqlite, |c| {
            pki.serve_tls(c);
            c.tls_client_ca = Some(pki.path("ca.pem"));
            c.tls_client_identity = clap::Parser::try_parse_from([
                "order-service",
                "--tls-cert",
                "x",
                "--tls-key",
                "x",
                "--tls-client-identity",
                field,
            ])
            .map(|c: order_service::config::Config| c.tls_client_identity)
            .unwrap();
        })
        .await;
        let mut client = pki.client(app.addr, Some(cert)).await.unwrap();
        let answer = client.place_order(limit_order(&new_key())).await;
        match account {
            Some(account) => {
                let placed = answer.unwrap_or_else(|s| panic!("{field} {cert}: {s:?}")).into_inner();
                assert_eq!(placed.order.unwrap().account_id, account, "{field} {cert}");
            }
            None => assert_eq!(answer.unwrap_err().code(), Code::Unauthenticated, "{field} {cert}"),
        }
    }
}

async fn tls_without_client_certificates_serves_token_callers(engine: Engine) {
    let pki = Pki::new();
    let tokens = Tokens::new();
    let file = tokens.file();
    let app = spawn_app_with(engine, |c| {
        pki.serve_tls(c);
        c.auth_tokens_file = Some(file);
    })
    .await;
    let mut client = pki.client(app.addr, None).await.unwrap();
    let placed =
        client.place_order(bearer(limit_order(&new_key()), &tokens.alice)).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "alice");
    let status = client.place_order(limit_order(&new_key())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

engine_tests!(
    calls_without_a_valid_token_are_unauthenticated_and_write_nothing,
    two_accounts_using_one_key_get_two_orders_and_never_see_each_others,
    health_and_reflection_need_no_credentials,
    an_oversized_request_is_refused_and_the_server_keeps_serving,
    mutual_tls_names_the_caller_by_its_certificate_and_refuses_order_calls_without_one,
    tls_without_client_certificates_serves_token_callers,
);

#[tokio::test]
async fn a_token_removed_from_the_file_is_revoked_on_sighup_and_a_new_one_accepted() {
    let tokens = Tokens::new();
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let file = tokens.file();
    let mut server =
        ServerProcess::start(&["--database-url", &url, "--auth-tokens-file", file.to_str().unwrap()]).await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    client.place_order(bearer(limit_order(&new_key()), &tokens.alice)).await.expect("alice's token works");

    let (carol, carol_line) = order_service::api::new_token("carol").unwrap();
    let bob_line =
        std::fs::read_to_string(&file).unwrap().lines().find(|l| l.starts_with("bob ")).unwrap().to_owned();
    write_atomically(&file, &format!("{bob_line}\n{carol_line}\n"));
    server.signal("HUP");
    let reloaded = server.log("reloaded auth tokens").await;
    assert_eq!(reloaded["tokens"], 2);

    let status = client.place_order(bearer(limit_order(&new_key()), &tokens.alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "alice's token is revoked");
    let placed = client.place_order(bearer(limit_order(&new_key()), &carol)).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "carol");
    client.place_order(bearer(limit_order(&new_key()), &tokens.bob)).await.expect("bob's token still works");

    // A bad line grants nothing and takes nothing back from the good ones.
    write_atomically(&file, &format!("carol not-a-hash\n{bob_line}\n"));
    server.signal("HUP");
    let problems = server.log("reloaded auth tokens with problems").await;
    assert_eq!(problems["tokens"], 1);
    assert!(problems["problems"].as_str().unwrap().contains("line 1"), "{problems}");
    let status = client.place_order(bearer(limit_order(&new_key()), &carol)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "carol's line is broken: her token is refused");
    client.place_order(bearer(limit_order(&new_key()), &tokens.bob)).await.expect("bob's token still works");
    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
}

/// The tokens file is reloaded when it changes, without a signal (a
/// Kubernetes Secret is updated by swapping a symlink, and a distroless
/// container cannot be signalled): a removed token is refused, even with a
/// bad line elsewhere in the new file, and the problem is logged and
/// counted.
#[tokio::test]
async fn a_token_removed_from_the_file_is_refused_once_the_file_changes_without_a_signal() {
    let tokens = Tokens::new();
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let dir = tempfile::tempdir().unwrap();
    // As Kubernetes mounts a Secret: the path is a symlink that is swapped.
    let link = dir.path().join("tokens");
    let first = dir.path().join("tokens.1");
    std::fs::copy(tokens.file(), &first).unwrap();
    std::os::unix::fs::symlink(&first, &link).unwrap();
    let mut server =
        ServerProcess::start(&["--database-url", &url, "--auth-tokens-file", link.to_str().unwrap()]).await;
    let mut client = OrderServiceClient::new(channel(server.addr).await);
    client.place_order(bearer(limit_order(&new_key()), &tokens.alice)).await.expect("alice's token works");

    let bob_line =
        std::fs::read_to_string(&first).unwrap().lines().find(|l| l.starts_with("bob ")).unwrap().to_owned();
    let second = dir.path().join("tokens.2");
    std::fs::write(&second, format!("{bob_line}\nnot a valid line\n")).unwrap();
    let swapped = dir.path().join("tokens.new");
    std::os::unix::fs::symlink(&second, &swapped).unwrap();
    std::fs::rename(&swapped, &link).unwrap();
    let reloaded = server.log("reloaded auth tokens with problems").await;
    assert_eq!((reloaded["tokens"].as_u64(), reloaded["why"].as_str()), (Some(1), Some("the file changed")));

    let status = client.place_order(bearer(limit_order(&new_key()), &tokens.alice)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "alice's token was removed");
    client.place_order(bearer(limit_order(&new_key()), &tokens.bob)).await.expect("bob's token still works");
    let failures = server.metric("orders_auth_token_reload_failures_total").await;
    assert_eq!(failures, 1.0, "the failed reload is counted");
    server.signal("TERM");
    assert!(server.child.wait().await.unwrap().success());
}

#[tokio::test]
async fn check_tokens_validates_a_file_before_it_is_deployed() {
    let tokens = Tokens::new();
    let out = tokio::process::Command::new(BIN)
        .args(["check-tokens", tokens.file().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 tokens"));
    // A path to something endless is refused, not read.
    let endless = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(BIN).args(["check-tokens", "/dev/zero"]).output(),
    )
    .await
    .expect("refused at once")
    .unwrap();
    assert_eq!(endless.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&endless.stderr).contains("larger than 1 MiB"));
    let bad = tokens.dir.path().join("bad");
    std::fs::write(&bad, format!("anonymous {}\nalice\n", "a".repeat(64))).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["check-tokens", bad.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 1") && stderr.contains("reserved") && stderr.contains("line 2"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_public_address_without_authentication_is_refused_at_start() {
    // Refused before anything is bound: tests never bind a non-loopback address.
    let out = tokio::process::Command::new(BIN).args(["--listen", "0.0.0.0:0"]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
}

#[tokio::test]
async fn hash_token_prints_a_token_and_its_line() {
    let out = tokio::process::Command::new(BIN).args(["hash-token", "checkout"]).output().await.unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('#')).collect();
    let [token, line] = lines[..] else { panic!("{stdout}") };
    assert!(token.starts_with("ost_") && token.len() == 68, "{token}");
    use sha2::Digest;
    assert_eq!(line, format!("checkout {}", hex::encode(sha2::Sha256::digest(token.as_bytes()))));
}

/// A TLS handshake that starts (more than the 33 bytes the plain-text
/// deadline asks for) and then stalls is cut off by the TLS handshake
/// timeout; a real TLS caller is served meanwhile.
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let app = spawn_app_with(Engine::Sqlite, |c| {
        pki.serve_tls(c);
        c.handshake_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // A TLS record header announcing a 512-byte ClientHello, and 64 bytes of it.
    let mut hello = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
    hello.resize(64, 0);
    stalled.write_all(&hello).await.unwrap();

    let mut client = pki.client(app.addr, None).await.unwrap();
    client.get_order(GetOrderRequest { lookup: Some(Lookup::ClientRequestId(new_key())) }).await.unwrap_err();

    assert!(closed_by_server(stalled).await, "the stalled handshake was not closed");
}

/// Order calls without credentials that start a large message and never
/// finish it, 20 connections x 128 streams at once: each is answered
/// `UNAUTHENTICATED` from its headers, the server holds on to none of their
/// bytes, and a caller with a token is served at the first attempt
/// throughout. (Before, each message was read whole before anyone asked who
/// sent it: 12 MB became 223 MB.)
#[tokio::test]
async fn unauthenticated_half_sent_messages_are_refused_from_their_headers_and_hold_no_memory() {
    use order_client::{ClientConfig, OrderClient};
    let tokens = Tokens::new();
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let file = tokens.file();
    let server =
        ServerProcess::start(&["--database-url", &url, "--auth-tokens-file", file.to_str().unwrap()]).await;
    let mut client = OrderClient::new(ClientConfig {
        token: Some(tokens.alice.clone()),
        ..ClientConfig::new(format!("http://{}", server.addr))
    })
    .unwrap();
    let place = async |client: &mut OrderClient, n: usize| {
        for _ in 0..n {
            let req = order_service::proto::PlaceOrderRequest {
                client_request_id: String::new(),
                ..limit_order("")
            };
            let placed = client.place_order(req).await.expect("a caller with a token is served");
            assert_eq!(placed.attempts, 1, "served at the first attempt");
        }
    };
    place(&mut client, 20).await;
    let (rss_before, fds_before) = (server.rss_kb(), server.open_fds());

    // A gRPC frame announcing a 60,000-byte message, and 50,000 of its bytes.
    let mut partial = vec![0u8; 5 + 50_000];
    partial[1..5].copy_from_slice(&60_000u32.to_be_bytes());
    let partial = prost::bytes::Bytes::from(partial);
    let (mut held, answers) =
        half_sent(server.addr, "/orders.v1.OrderService/PlaceOrder", 20, &partial).await;
    place(&mut client, 20).await;
    let during = (server.rss_kb(), server.open_fds());
    let mut unauthenticated = 0;
    for answer in answers {
        let response = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("an answer without waiting for the message")
            .expect("a response");
        assert!(response.headers().contains_key("grpc-status"), "answered from the headers alone");
        assert_eq!(grpc_status(response).await, "16", "UNAUTHENTICATED");
        unauthenticated += 1;
    }
    place(&mut client, 20).await;

    // The services that need no credentials: the same flood at health and
    // reflection is refused from each message's length prefix (they used to
    // buffer up to 4 MiB a stream: +527 MB for one connection's 128).
    let rss_open_before = server.rss_kb();
    let mut open_refused = 0;
    for path in ["/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"]
    {
        let (streams, answers) = half_sent(server.addr, path, 5, &partial).await;
        held.extend(streams);
        for answer in answers {
            let response = tokio::time::timeout(Duration::from_secs(10), answer).await.unwrap().unwrap();
            let status = grpc_status(response).await;
            // Health answers OUT_OF_RANGE; the reflection stream, told its
            // request stream failed, ends. Neither buffers the message. Past
            // the 256 open calls a listener lets wait for their request, the
            // rest of the burst is refused at once (RESOURCE_EXHAUSTED).
            let refused = status == "11" || status == "8";
            assert!(refused || (status == "0" && path.contains("Reflection")), "{path}: {status}");
            open_refused += 1;
        }
    }
    place(&mut client, 20).await;
    let (rss_after, fds_after) = (server.rss_kb(), server.open_fds());
    println!(
        "open services flood: {open_refused} streams refused from their length prefix; \
         RSS {rss_open_before} kB before, {rss_after} kB after"
    );
    assert!(rss_after < rss_open_before + 32 * 1024, "RSS grew from {rss_open_before} kB to {rss_after} kB");
    println!(
        "unauthenticated flood: {unauthenticated} streams refused; RSS {rss_before} kB before, {} kB during, \
         {rss_after} kB after; open fds {fds_before} before, {} during, {fds_after} after; \
         the caller with a token: 80 orders, each at the first attempt",
        during.0, during.1
    );
    assert!(during.0 < rss_before + 32 * 1024, "RSS grew from {rss_before} kB to {}", during.0);
    drop(held);
}

/// Health checks that send 999 bytes of a 1,000-byte message and never the
/// rest, 25 connections x 128 streams on each listener, no credentials: at
/// most 256 of them wait for their request on a listener (each newcomer
/// evicts the one that waited longest, answered `RESOURCE_EXHAUSTED`),
/// memory stays bounded, and through it all a health check answers on
/// either listener and a caller with a token is served. (Each waiting
/// stream held about 12 KB: 50 connections took 24 MB to 99 MB, and the
/// health listener, without the gRPC listener's HTTP/2 bounds, 20
/// connections to 255 MB; refusing newcomers instead let 256 half-sent calls
/// fail every probe.)
#[tokio::test]
async fn half_sent_open_service_calls_are_bounded() {
    use order_client::{ClientConfig, OrderClient};
    let tokens = Tokens::new();
    let db = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", db.path().join("orders.db").display());
    let file = tokens.file();
    let server = ServerProcess::start(&[
        "--database-url",
        &url,
        "--auth-tokens-file",
        file.to_str().unwrap(),
        "--health-listen",
        "127.0.0.1:0",
    ])
    .await;
    let mut client = OrderClient::new(ClientConfig {
        token: Some(tokens.alice.clone()),
        ..ClientConfig::new(format!("http://{}", server.addr))
    })
    .unwrap();
    client.place_order(limit_order(&new_key())).await.expect("served before");
    let rss_before = server.rss_kb();

    let mut partial = vec![0u8; 5 + 999];
    partial[1..5].copy_from_slice(&1_000u32.to_be_bytes());
    let partial = prost::bytes::Bytes::from(partial);
    let mut held = Vec::new();
    let mut refused = 0;
    for (name, addr) in [("gRPC", server.addr), ("health", server.health_addr())] {
        let (streams, answers) = half_sent(addr, "/grpc.health.v1.Health/Check", 25, &partial).await;
        held.extend(streams);
        let mut waiting = tokio::task::JoinSet::new();
        for answer in answers {
            waiting.spawn(async move { grpc_status(answer.await.unwrap()).await });
        }
        // A probe is answered in the midst of it.
        let mut health = HealthClient::new(channel(addr).await);
        let check = health.check(HealthCheckRequest { service: String::new() }).await;
        check.unwrap_or_else(|status| panic!("{name}: a health check answers during the flood: {status:?}"));
        // Every stream but the last 256 to wait is evicted, and answered.
        let answered = async {
            let mut n = 0;
            while n < 25 * 128 - 256 {
                let status = waiting.join_next().await.unwrap().unwrap();
                assert_eq!(status, "8", "RESOURCE_EXHAUSTED");
                n += 1;
            }
            n
        };
        refused +=
            tokio::time::timeout(Duration::from_secs(20), answered).await.expect("evicted, and answered");
        waiting.detach_all();
    }
    let rss_during = server.rss_kb();
    let placed = client.place_order(limit_order(&new_key())).await.expect("a caller with a token is served");
    assert_eq!(placed.attempts, 1, "at the first attempt");
    println!(
        "half-sent open-service calls: {refused} evicted and refused, 512 waiting; RSS {rss_before} kB before, \
         {rss_during} kB during"
    );
    assert!(rss_during < rss_before + 32 * 1024, "RSS grew from {rss_before} kB to {rss_during} kB");
    drop(held);
}

/// Two `authorization` headers are refused, even when both are valid: which
/// one counts must never depend on a proxy's or a library's choice.
#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let tokens = Tokens::new();
    let mut app = spawn_with_tokens(Engine::Sqlite, &tokens).await;
    let mut request = bearer(limit_order(&new_key()), &tokens.alice);
    request.metadata_mut().append("authorization", format!("Bearer {}", tokens.alice).parse().unwrap());
    let status = app.client.place_order(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(app.count("orders").await, 0);
}

/// The SQLite files hold every account's orders: they are created readable
/// by their owner alone.
#[cfg(unix)]
#[tokio::test]
async fn sqlite_files_are_created_private() {
    use std::os::unix::fs::PermissionsExt;
    let app = crate::helpers::spawn_app(Engine::Sqlite).await;
    let mut app = app;
    app.place(limit_order(&new_key())).await;
    let db = app.config.database_url.strip_prefix("sqlite://").unwrap().to_owned();
    for suffix in ["", "-wal", "-shm", ".startup-lock"] {
        let mode = std::fs::metadata(format!("{db}{suffix}")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{db}{suffix} has mode {mode:o}");
    }
}

/// A TLS client config trusting `ca_pem`, presenting no certificate.
fn tls_client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls::{
        ClientConfig, RootCertStore, pki_types::CertificateDer, pki_types::pem::PemObject,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// Opens `connections` connections to `addr` with 128 streams each to `path`,
/// each sending `partial` and never ending: the streams (held open) and
/// their answers.
async fn half_sent(
    addr: SocketAddr,
    path: &str,
    connections: usize,
    partial: &prost::bytes::Bytes,
) -> (Vec<h2::SendStream<prost::bytes::Bytes>>, Vec<h2::client::ResponseFuture>) {
    let (mut held, mut answers) = (Vec::new(), Vec::new());
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        for _ in 0..128 {
            let mut sender = sender.clone().ready().await.unwrap();
            let request = tonic::codegen::http::Request::post(format!("http://{addr}{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut body) = sender.send_request(request, false).unwrap();
            // Never ends the stream: the rest of the message never comes.
            let _ = body.send_data(partial.clone(), false);
            held.push(body);
            answers.push(response);
        }
    }
    (held, answers)
}

/// The `grpc-status` of a response: from its headers (trailers-only), else
/// from its trailers.
async fn grpc_status(response: tonic::codegen::http::Response<h2::RecvStream>) -> String {
    let status = |headers: &tonic::codegen::http::HeaderMap| {
        headers.get("grpc-status").map(|s| s.to_str().unwrap().to_owned())
    };
    if let Some(found) = status(response.headers()) {
        return found;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let _ = data;
    }
    body.trailers().await.unwrap().as_ref().and_then(status).unwrap_or_default()
}

/// A server process serving TLS from `pki`'s files (copied into `dir`, so a
/// test can replace them), with client certificates and a 1 s handshake
/// timeout.
async fn tls_server(pki: &Pki, dir: &std::path::Path) -> ServerProcess {
    for name in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(pki.path(name), dir.join(name)).unwrap();
    }
    let url = format!("sqlite://{}", dir.join("orders.db").display());
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    ServerProcess::start(&[
        "--database-url",
        &url,
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--handshake-timeout",
        "1s",
    ])
    .await
}

/// Under TLS, a connection that finishes its TLS handshake and then says
/// nothing is closed within the handshake timeout (it used to be held until
/// the connection's maximum age: the TLS handshake met the deadline), and so
/// is one that makes a request and then stalls in its next header block.
#[tokio::test]
async fn a_connection_silent_or_stalled_after_its_tls_handshake_is_closed() {
    use tokio::io::AsyncWriteExt;
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(&pki, dir.path()).await;
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let connect = async || {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tls_client(&pki.ca_pem).connect(name.clone(), tcp).await.expect("the TLS handshake succeeds")
    };
    let silent = connect().await;
    assert!(closed_by_server(silent).await, "the silent connection is closed by the server");
    let mut stalled = connect().await;
    stalled.write_all(&[raw_h2::opening_and_request(), raw_h2::stalled_headers()].concat()).await.unwrap();
    assert!(closed_by_server(stalled).await, "the stalled header block is closed by the server");
}

/// A refused TLS handshake is logged with the peer and the reason, and
/// counted: an operator can tell why a caller is turned away.
#[tokio::test]
async fn a_refused_tls_handshake_is_logged_with_its_reason_and_counted() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let mut server = tls_server(&pki, dir.path()).await;
    let rogue = Pki::new();
    std::fs::copy(rogue.path("spiffe.pem"), pki.path("rogue.pem")).unwrap();
    std::fs::copy(rogue.path("spiffe.key"), pki.path("rogue.key")).unwrap();
    let refused = match pki.client(server.addr, Some("rogue")).await {
        Err(_) => true,
        Ok(mut client) => client.place_order(limit_order(&new_key())).await.is_err(),
    };
    assert!(refused, "a certificate from an unknown CA is refused");
    let logged = server.log("refused a TLS handshake").await;
    assert!(logged["peer"].as_str().is_some_and(|p| p.contains("127.0.0.1")), "{logged}");
    assert!(logged["reason"].as_str().is_some_and(|r| !r.is_empty()), "{logged}");
    assert!(server.metric("orders_tls_handshake_failures_total").await >= 1.0);
}

/// A renewed certificate is served without a restart once its files change;
/// a broken one keeps the certificate in force, logged and counted.
#[tokio::test]
async fn the_tls_certificate_is_reloaded_when_its_files_change() {
    let (old, new) = (Pki::new(), Pki::new());
    let dir = tempfile::tempdir().unwrap();
    let mut server = tls_server(&old, dir.path()).await;
    assert!(new.client(server.addr, Some("spiffe")).await.is_err(), "the new CA is not trusted yet");

    // Renewed: the new CA's server certificate, key and client CA.
    for name in ["server.pem", "server.key", "ca.pem"] {
        std::fs::copy(new.path(name), dir.path().join(name)).unwrap();
    }
    server.log("reloaded the TLS certificate and key").await;
    let mut client =
        new.client(server.addr, Some("spiffe")).await.expect("the renewed certificate is served");
    let placed = client.place_order(limit_order(&new_key())).await.unwrap().into_inner();
    assert_eq!(placed.order.unwrap().account_id, "spiffe://example.test/ns/prod/sa/checkout");

    // Broken: the certificate in force stays.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    server.log("keeping the TLS certificate in force").await;
    assert!(new.client(server.addr, Some("spiffe")).await.is_ok(), "still served");
    assert!(server.metric("orders_tls_reload_failures_total").await >= 1.0, "the failed reload is counted");
}

/// A client CA rotated away ends the connections it vouched for at the
/// reload (they used to keep working until --max-connection-age), and a
/// new connection with its certificate is refused.
#[tokio::test]
async fn a_client_ca_rotated_away_ends_the_connections_it_vouched_for() {
    let (old, new) = (Pki::new(), Pki::new());
    let dir = tempfile::tempdir().unwrap();
    let mut server = tls_server(&old, dir.path()).await;
    let mut client = old.client(server.addr, Some("spiffe")).await.expect("the old CA is trusted");
    client.place_order(limit_order(&new_key())).await.expect("served before the rotation");

    // Only the client CA changes: the server's own certificate stays.
    std::fs::copy(new.path("ca.pem"), dir.path().join("ca.pem")).unwrap();
    let reloaded = server.log("reloaded the TLS certificate and key").await;
    assert_eq!(reloaded["closed"], 1, "the connection the old CA vouched for is closed: {reloaded}");
    let answer = client.place_order(limit_order(&new_key())).await;
    assert!(answer.is_err(), "the old CA's certificate is served no more: {answer:?}");
    assert!(server.metric("orders_connections_evicted_total{reason=\"client_ca\"}").await >= 1.0);
}

/// Passwords in a database URL never reach the output, even as parameters
/// the driver does not know (it logs those with their value).
#[tokio::test]
async fn database_passwords_are_never_printed() {
    let url =
        "postgres://app:hun%2Fter1@127.0.0.1:1/orders?sslpassword=hunter2&passwd=hunter3&PASSWORD=hunter4";
    let out = tokio::process::Command::new(BIN)
        .args(["--db-connect-timeout", "1s", "--log-format", "json"])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "trace")
        .output()
        .await
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "nothing listens on port 1");
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for secret in ["hun%2Fter1", "hun/ter1", "hunter2", "hunter3", "hunter4"] {
        assert!(!printed.contains(secret), "{secret} was printed: {printed}");
    }
}
