//! A TCP proxy on 127.0.0.1:0 that a test can repoint and hold back: the
//! stable address in front of whichever Postgres is primary (as a
//! Kubernetes Service or haproxy is), and a replication link that stops
//! carrying bytes while the test says so.

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Mutex, watch},
    task::JoinHandle,
};

/// A running proxy; dropping it stops it and cuts its connections.
pub struct Proxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    held: watch::Sender<bool>,
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards each connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let (held, _) = watch::channel(false);
        let (cut, _) = watch::channel(0u64);
        let (to, h, c) = (target.clone(), held.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let target = *to.lock().await;
                let (held, cut) = (h.subscribe(), c.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        () = pump(client_read, server_write, held.clone()) => {}
                        () = pump(server_read, client_write, held) => {}
                        _ = cut_when_changed(cut) => {}
                    }
                });
            }
        });
        Proxy { addr, target, held, cut, task }
    }

    /// New connections go to `target`; the open ones are cut.
    pub async fn repoint(&self, target: SocketAddr) {
        *self.target.lock().await = target;
        self.cut.send_modify(|n| *n += 1);
    }

    /// Holds every byte back (`true`) until released (`false`).
    pub fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}

/// Copies `from` to `to` until either ends, waiting while held.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut held: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if held.wait_for(|held| !held).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Resolves when the proxy cuts its connections.
async fn cut_when_changed(mut cut: watch::Receiver<u64>) {
    let _ = cut.changed().await;
}
