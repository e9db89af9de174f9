//! Listening sockets: parse a listen address, bind TCP or Unix sockets and
//! run the accept loop that spawns one task per connection.

use std::fmt;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use super::{ExportProvider, ServerConfig, serve_connection};

/// Where to listen: `HOST:PORT`, `[::1]:PORT` or `unix:/path/to.sock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A listen address that could not be parsed or resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid listen address {input:?}: {reason}")]
pub struct ListenAddrError {
    pub input: String,
    pub reason: String,
}

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ListenAddrError {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(err("empty socket path"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        // Host names (e.g. "localhost:10809"): resolve once, take the first.
        match s.to_socket_addrs() {
            Ok(mut addrs) => addrs
                .next()
                .map(ListenAddr::Tcp)
                .ok_or_else(|| err("host resolved to no addresses")),
            Err(e) => Err(err(&e.to_string())),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub struct Listener {
    inner: Inner,
}

#[derive(Debug)]
enum Inner {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
}

impl Listener {
    /// The bound address in [`ListenAddr`] syntax (with the real port when
    /// bound to port 0).
    pub fn local_addr_string(&self) -> String {
        match &self.inner {
            Inner::Tcp(l) => match l.local_addr() {
                Ok(a) => a.to_string(),
                Err(_) => "tcp:unknown".to_owned(),
            },
            Inner::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }
}

/// Binds `addr`. For Unix sockets a stale socket file left by a previous
/// run is removed first (anything else at that path is an error).
pub async fn bind(addr: &ListenAddr) -> std::io::Result<Listener> {
    let inner = match addr {
        ListenAddr::Tcp(a) => Inner::Tcp(TcpListener::bind(a).await?),
        ListenAddr::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
                Ok(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        format!("{} exists and is not a socket", path.display()),
                    ));
                }
                Err(_) => {}
            }
            Inner::Unix {
                listener: UnixListener::bind(path)?,
                path: path.clone(),
            }
        }
    };
    Ok(Listener { inner })
}

/// Accepts connections until `shutdown` resolves, serving each on its own
/// task. Connections already accepted keep running after it returns.
pub async fn serve(
    listener: Listener,
    provider: Arc<dyn ExportProvider>,
    cfg: Arc<ServerConfig>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    info!(addr = %listener.local_addr_string(), "NBD server listening");
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            r = accept(&listener.inner) => r,
        };
        match accepted {
            Ok(Accepted::Tcp(stream, peer)) => {
                // Replies are already batched; don't let Nagle delay them.
                let _ = stream.set_nodelay(true);
                spawn_connection(stream, peer.to_string(), &provider, &cfg);
            }
            Ok(Accepted::Unix(stream)) => {
                spawn_connection(stream, "unix".to_owned(), &provider, &cfg);
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    if let Inner::Unix { path, .. } = &listener.inner {
        let _ = std::fs::remove_file(path);
    }
    info!("NBD server stopped accepting connections");
    Ok(())
}

enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

async fn accept(inner: &Inner) -> std::io::Result<Accepted> {
    match inner {
        Inner::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
        Inner::Unix { listener, .. } => listener.accept().await.map(|(s, _)| Accepted::Unix(s)),
    }
}

fn spawn_connection<S>(
    stream: S,
    peer: String,
    provider: &Arc<dyn ExportProvider>,
    cfg: &Arc<ServerConfig>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let provider = provider.clone();
    let cfg = cfg.clone();
    tokio::spawn(async move {
        debug!(%peer, "NBD connection accepted");
        match serve_connection(stream, provider, cfg).await {
            Ok(()) => debug!(%peer, "NBD connection finished"),
            Err(e) => info!(%peer, error = %e, "NBD connection ended with an error"),
        }
    });
}
