//! `tabula serve`: controller, agent and default container in one process.

use std::sync::Arc;

use anyhow::{Context, Result};
use tabula_agent::{Agent, AgentConfig};
use tabula_api::ControlPlane;
use tabula_controller::{Controller, ControllerConfig};
use tabula_nbd::server::{ListenAddr, ServerConfig};
use tracing::info;

use crate::cli::ServeArgs;

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TABULA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    init_tracing();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(args))
}

async fn serve(mut args: ServeArgs) -> Result<()> {
    args.data_dir = std::path::absolute(&args.data_dir)
        .with_context(|| format!("resolving --data-dir {}", args.data_dir.display()))?;
    let nbd_addr: ListenAddr = args
        .nbd_listen
        .parse()
        .with_context(|| format!("--nbd-listen {}", args.nbd_listen))?;
    let ctl = Controller::open(ControllerConfig::new(&args.data_dir))
        .await
        .with_context(|| format!("opening the controller in {}", args.data_dir.display()))?;
    ctl.ensure_default_container(args.container_size)
        .await
        .context("creating the default container")?;
    let plane: Arc<dyn ControlPlane> = ctl.clone();
    let mut agent_cfg = AgentConfig::new(&args.name);
    // Test hook for race tests (see AgentConfig::read_delay); never set in production.
    if let Ok(ms) = std::env::var("TABULA_TEST_READ_DELAY_MS") {
        let ms: u64 = ms
            .parse()
            .context("TABULA_TEST_READ_DELAY_MS must be milliseconds")?;
        tracing::warn!(ms, "test hook: every container read is delayed");
        agent_cfg.read_delay = Some(std::time::Duration::from_millis(ms));
    }
    let agent = Agent::start(agent_cfg, plane)
        .await
        .context("starting the agent")?;

    let api = tokio::net::TcpListener::bind(&args.api_listen)
        .await
        .with_context(|| {
            format!(
                "binding the admin API to {} (in use? pick another --api-listen)",
                args.api_listen
            )
        })?;
    let nbd = tabula_nbd::server::bind(&nbd_addr).await.with_context(|| {
        format!(
            "binding NBD to {} (in use? pick another --nbd-listen)",
            args.nbd_listen
        )
    })?;
    info!(
        nbd = %nbd.local_addr_string(),
        api = %api.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        data_dir = %args.data_dir.display(),
        "tabula serve ready"
    );
    eprintln!(
        "tabula serve: NBD on {}, admin API on http://{}, data in {}",
        nbd.local_addr_string(),
        api.local_addr()?,
        args.data_dir.display()
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let api_task = tokio::spawn(tabula_controller::http::serve(
        api,
        ctl.clone(),
        wait(stop_rx.clone()),
    ));
    let provider = Arc::new(agent.clone());
    let nbd_task = tokio::spawn(tabula_nbd::server::serve(
        nbd,
        provider,
        Arc::new(ServerConfig::default()),
        wait(stop_rx.clone()),
    ));
    shutdown_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = nbd_task.await;
    let _ = api_task.await;
    agent
        .flush()
        .await
        .context("flushing containers on shutdown")?;
    info!("stopped cleanly");
    Ok(())
}
