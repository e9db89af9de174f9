//! `tabula container serve`: one file or block device served as an NBD export, so that it
//! can be a remote container for tabula on other hosts (or for any NBD client).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use tabula_container::Container;
use tabula_container::export::ContainerExport;
use tabula_nbd::server::mem::StaticProvider;
use tabula_nbd::server::{ListenAddr, ServerConfig};
use tracing::info;

/// `--help` of `tabula container serve`.
pub const LONG_ABOUT: &str = "Serve one file or block device as an NBD export, so tabula on \
other hosts (or any NBD client) can use it as a remote container.\n\n\
Every connection shares the one file, so a flush on any of them covers all (the export \
advertises multi-conn). Writes with FUA and flushes are made durable (fdatasync) before they \
are answered; trim and write-zeroes punch holes. On SIGTERM or ctrl-c it stops accepting \
connections, syncs and exits.\n\n\
Example:\n  tabula container serve /srv/c1.img --size 100G --listen 0.0.0.0:10810\n  \
tabula container add c1 --uri nbd://THIS-HOST:10810/disk0";

#[derive(Args, Debug)]
pub struct ContainerServeArgs {
    /// The file or block device to export.
    pub path: PathBuf,
    /// Where to listen: HOST:PORT, [::1]:PORT or unix:/path/to.sock.
    #[arg(long)]
    pub listen: String,
    /// The export's name (clients connect to nbd://HOST:PORT/NAME).
    #[arg(long, default_value = "disk0")]
    pub export: String,
    /// Create the file as a sparse file of this size if it does not exist, or grow it to
    /// this size (never shrinks). Without it the file must exist.
    #[arg(long, value_parser = crate::cli::container_size_arg)]
    pub size: Option<u64>,
    /// Refuse writes.
    #[arg(long)]
    pub read_only: bool,
}

pub fn run(args: ContainerServeArgs) -> Result<()> {
    crate::serve::init_tracing();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

fn open(args: &ContainerServeArgs) -> Result<Container> {
    let path = &args.path;
    let c = match args.size {
        Some(size) => Container::create(path, size),
        None if !path.exists() => bail!(
            "{} does not exist; give --size to create it as a sparse file",
            path.display()
        ),
        None => Container::open(path, 0),
    };
    let c = c.with_context(|| format!("opening {}", path.display()))?;
    if c.len_bytes()? == 0 {
        bail!(
            "{} is empty; give --size to make it a useful size",
            path.display()
        );
    }
    Ok(c)
}

/// The URI clients use, given the address actually bound.
fn uri(bound: &str, export: &str) -> String {
    match bound.strip_prefix("unix:") {
        Some(path) => format!("nbd+unix:///{export}?socket={path}"),
        None => format!("nbd://{bound}/{export}"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn serve(args: ContainerServeArgs) -> Result<()> {
    if args.export.len() > 4096 || args.export.contains('\0') {
        bail!("--export must be at most 4096 bytes and contain no NUL");
    }
    let container = Arc::new(open(&args)?);
    let export = ContainerExport::new(container.clone(), args.read_only)
        .with_context(|| format!("sizing {}", container.describe()))?;
    let size = container.len_bytes()?;
    let provider = Arc::new(StaticProvider::new().with(args.export.clone(), Arc::new(export)));
    let addr: ListenAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen {}", args.listen))?;
    let listener = tabula_nbd::server::bind(&addr).await.with_context(|| {
        format!(
            "binding NBD to {} (in use? pick another --listen)",
            args.listen
        )
    })?;
    let bound = listener.local_addr_string();
    let uri = uri(&bound, &args.export);
    let mode = if args.read_only {
        "read-only"
    } else {
        "read-write"
    };
    info!(
        container = %container.describe(),
        size,
        export = %args.export,
        listen = %bound,
        mode,
        "tabula container serve ready"
    );
    eprintln!(
        "tabula container serve: {} ({}, {mode}) as NBD export {:?} on {bound}\n\
         add it to tabula with: tabula container add NAME --uri {uri}",
        container.describe(),
        tabula_core::format_size(size),
        args.export,
    );
    if bound.starts_with("0.0.0.0:") || bound.starts_with("[::]:") {
        eprintln!("(replace the wildcard address with this host's name or address)");
    }
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(tabula_nbd::server::serve(
        listener,
        provider,
        Arc::new(ServerConfig::default()),
        async move {
            let _ = stop_rx.wait_for(|v| *v).await;
        },
    ));
    shutdown_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "NBD server ended with an error"),
        Err(e) => tracing::warn!(error = %e, "NBD server task failed"),
    }
    // Connections still open are cut when the runtime ends; everything they had written is
    // made durable first.
    let c = container.clone();
    tokio::task::spawn_blocking(move || c.sync())
        .await
        .context("syncing on shutdown")?
        .with_context(|| format!("syncing {} on shutdown", container.describe()))?;
    info!("stopped cleanly");
    Ok(())
}
