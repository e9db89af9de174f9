//! The daemons: `tabula serve` (controller, agent and default container in one process),
//! `tabula controller` and `tabula agent` (the same parts as separate processes, talking
//! gRPC). All three share the code below; only the transport between the parts differs.

use std::sync::Arc;

use anyhow::{Context, Result};
use tabula_agent::remote::RemoteControl;
use tabula_agent::{Agent, AgentConfig};
use tabula_api::ControlPlane;
use tabula_controller::{Controller, ControllerConfig};
use tabula_nbd::server::{ListenAddr, ServerConfig};
use tracing::info;

use crate::cli::{AgentArgs, ControllerArgs, ServeArgs};

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

fn runtime() -> Result<tokio::runtime::Runtime> {
    init_tracing();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(args: ServeArgs) -> Result<()> {
    runtime()?.block_on(serve(args))
}

pub fn run_controller(args: ControllerArgs) -> Result<()> {
    runtime()?.block_on(controller(args))
}

pub fn run_agent(args: AgentArgs, controller: &str) -> Result<()> {
    runtime()?.block_on(agent(args, controller))
}

/// Test hook for race tests (see AgentConfig::read_delay); never set in production.
fn agent_config(name: &str) -> Result<AgentConfig> {
    let mut cfg = AgentConfig::new(name);
    if let Ok(ms) = std::env::var("TABULA_TEST_READ_DELAY_MS") {
        let ms: u64 = ms
            .parse()
            .context("TABULA_TEST_READ_DELAY_MS must be milliseconds")?;
        tracing::warn!(ms, "test hook: every container read is delayed");
        cfg.read_delay = Some(std::time::Duration::from_millis(ms));
    }
    Ok(cfg)
}

/// Test hooks: pauses at the points crash tests kill the controller in, from
/// `TABULA_TEST_*_PAUSE_MS`; never set in production.
fn test_pauses(p: &mut tabula_controller::TestPauses) -> Result<()> {
    for (var, slot) in [
        (
            "TABULA_TEST_SNAPSHOT_COMMIT_PAUSE_MS",
            &mut p.snapshot_commit,
        ),
        ("TABULA_TEST_COW_SWITCH_PAUSE_MS", &mut p.cow_switch),
        ("TABULA_TEST_MOVE_SWITCH_PAUSE_MS", &mut p.move_switch),
        ("TABULA_TEST_FAULT_ANSWER_PAUSE_MS", &mut p.fault_answer),
    ] {
        if let Ok(ms) = std::env::var(var) {
            let ms: u64 = ms
                .parse()
                .with_context(|| format!("{var} must be milliseconds"))?;
            tracing::warn!(var, ms, "test hook: the controller pauses here");
            *slot = Some(std::time::Duration::from_millis(ms));
        }
    }
    Ok(())
}

async fn open_controller(
    data_dir: &mut std::path::PathBuf,
    container_size: u64,
    cfg: impl FnOnce(&mut ControllerConfig),
) -> Result<Arc<Controller>> {
    *data_dir = std::path::absolute(&*data_dir)
        .with_context(|| format!("resolving --data-dir {}", data_dir.display()))?;
    let mut c = ControllerConfig::new(&*data_dir);
    cfg(&mut c);
    test_pauses(&mut c.test_pauses)?;
    let ctl = Controller::open(c)
        .await
        .with_context(|| format!("opening the controller in {}", data_dir.display()))?;
    ctl.ensure_default_container(container_size)
        .await
        .context("creating the default container")?;
    ctl.start_background();
    Ok(ctl)
}

async fn bind_api(addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("binding the admin API to {addr} (in use? pick another --api-listen)")
    })
}

async fn bind_nbd(addr: &str) -> Result<tabula_nbd::server::Listener> {
    let parsed: ListenAddr = addr
        .parse()
        .with_context(|| format!("--nbd-listen {addr}"))?;
    tabula_nbd::server::bind(&parsed)
        .await
        .with_context(|| format!("binding NBD to {addr} (in use? pick another --nbd-listen)"))
}

type Stop = tokio::sync::watch::Receiver<bool>;

async fn stopped(mut rx: Stop) {
    let _ = rx.wait_for(|v| *v).await;
}

/// Serves the admin API (with the agents' gRPC channel if asked) and/or NBD until SIGINT
/// or SIGTERM, then stops accepting, lets requests in flight finish, and flushes the
/// agent's containers.
async fn run_until_signal(
    api: Option<(tokio::net::TcpListener, Arc<Controller>, bool)>,
    nbd: Option<(tabula_nbd::server::Listener, Agent)>,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_task = api.map(|(listener, ctl, grpc)| {
        tokio::spawn(tabula_controller::http::serve(
            listener,
            ctl,
            grpc,
            stopped(stop_rx.clone()),
        ))
    });
    let (nbd_task, agent) = match nbd {
        Some((listener, agent)) => {
            agent.spawn_gap_healer();
            let task = tokio::spawn(tabula_nbd::server::serve(
                listener,
                Arc::new(agent.clone()),
                Arc::new(ServerConfig::default()),
                stopped(stop_rx.clone()),
            ));
            (Some(task), Some(agent))
        }
        None => (None, None),
    };
    shutdown_signal().await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    // Requests in flight get a bounded time to finish: a peer that vanished without a
    // word (power, cable) would otherwise hold its connection open until TCP gives up.
    let grace = std::time::Duration::from_secs(5);
    for (what, task) in [("NBD", nbd_task), ("admin API", api_task)] {
        if let Some(t) = task {
            if tokio::time::timeout(grace, t).await.is_err() {
                tracing::warn!("{what} connections still open after {grace:?}; closing them");
            }
        }
    }
    if let Some(agent) = agent {
        agent
            .flush()
            .await
            .context("flushing containers on shutdown")?;
    }
    info!("stopped cleanly");
    Ok(())
}

async fn serve(mut args: ServeArgs) -> Result<()> {
    let hold = args.snapshot_hold;
    let (timeout, low) = (args.pool.container_timeout, args.pool.low_space_percent);
    let ctl = open_controller(&mut args.data_dir, args.container_size, |c| {
        c.snapshot_hold = hold;
        c.container_timeout = timeout;
        c.low_space_percent = low;
    })
    .await?;
    let plane: Arc<dyn ControlPlane> = ctl.clone();
    let mut agent_cfg = agent_config(&args.name)?;
    agent_cfg.container_timeout = timeout;
    agent_cfg.fault_wait = args.fault_wait;
    let agent = Agent::start(agent_cfg, plane)
        .await
        .context("starting the agent")?;
    let api = bind_api(&args.api_listen).await?;
    let nbd = bind_nbd(&args.nbd_listen).await?;
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
    run_until_signal(Some((api, ctl, false)), Some((nbd, agent))).await
}

async fn controller(mut args: ControllerArgs) -> Result<()> {
    if !args.ha.etcd.is_empty() {
        return ha_controller(args).await;
    }
    let lease = args.lease;
    let refresh = args.refresh_interval;
    let hold = args.snapshot_hold;
    let (timeout, low) = (args.pool.container_timeout, args.pool.low_space_percent);
    if lease.is_zero() {
        anyhow::bail!("--lease must be more than 0");
    }
    let ctl = open_controller(&mut args.data_dir, args.container_size, |c| {
        c.lease = lease;
        c.restart_grace = true;
        c.refresh_interval = (!refresh.is_zero()).then_some(refresh);
        c.snapshot_hold = hold;
        c.container_timeout = timeout;
        c.low_space_percent = low;
    })
    .await?;
    let api = bind_api(&args.api_listen).await?;
    let addr = api.local_addr()?;
    info!(api = %addr, data_dir = %args.data_dir.display(), lease = ?lease, "tabula controller ready");
    eprintln!(
        "tabula controller ready: admin API and agents on http://{addr}, data in {}",
        args.data_dir.display()
    );
    run_until_signal(Some((api, ctl, true)), None).await
}

/// A controller of a highly available control plane (`--etcd`).
async fn ha_controller(mut args: ControllerArgs) -> Result<()> {
    if args.lease.is_zero() {
        anyhow::bail!("--lease must be more than 0");
    }
    let ttl = args.ha.election_ttl;
    if ttl < std::time::Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        anyhow::bail!(
            "--election-ttl must be whole seconds, at least 1s (etcd leases count seconds)"
        );
    }
    if ttl >= args.lease {
        anyhow::bail!(
            "--election-ttl ({ttl:?}) must be shorter than the agents' --lease ({:?}): agents ride through a failover on their lease",
            args.lease
        );
    }
    args.data_dir = std::path::absolute(&args.data_dir)
        .with_context(|| format!("resolving --data-dir {}", args.data_dir.display()))?;
    let api = bind_api(&args.api_listen).await?;
    let addr = api.local_addr()?;
    let api_url = match &args.ha.advertise_url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if addr.ip().is_unspecified() => anyhow::bail!(
            "--api-listen {addr} is a wildcard address: give --advertise-url, the address others reach this controller at"
        ),
        None => format!("http://{addr}"),
    };
    let name = match args.ha.name.clone() {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "controller".into()),
    };
    tabula_controller::service::validate_name("controller", &name).map_err(anyhow::Error::msg)?;
    let mut c = ControllerConfig::new(&args.data_dir);
    c.lease = args.lease;
    c.restart_grace = true;
    c.refresh_interval = (!args.refresh_interval.is_zero()).then_some(args.refresh_interval);
    c.snapshot_hold = args.snapshot_hold;
    c.container_timeout = args.pool.container_timeout;
    c.low_space_percent = args.pool.low_space_percent;
    test_pauses(&mut c.test_pauses)?;
    let keep_records = match std::env::var("TABULA_TEST_HA_KEEP_RECORDS") {
        Ok(v) => v
            .parse()
            .context("TABULA_TEST_HA_KEEP_RECORDS must be a number")?,
        Err(_) => tabula_controller::ha::node::KEEP_RECORDS,
    };
    let ha = tabula_controller::ha::HaConfig {
        keep_records,
        etcd: args.ha.etcd.clone(),
        prefix: args.ha.etcd_prefix.clone(),
        name: name.clone(),
        api_url: api_url.clone(),
        election_ttl: ttl,
    };
    info!(api = %api_url, name, etcd = ?args.ha.etcd, data_dir = %args.data_dir.display(), "tabula controller starting (high availability)");
    eprintln!(
        "tabula controller {name}: admin API and agents on {api_url}, data in {}, control plane on etcd {}",
        args.data_dir.display(),
        args.ha.etcd.join(",")
    );
    tabula_controller::ha::run(c, ha, api, shutdown_signal())
        .await
        .context("running the controller")?;
    info!("stopped cleanly");
    Ok(())
}

async fn agent(args: AgentArgs, controller: &str) -> Result<()> {
    let name = match args.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "agent".into()),
    };
    let mut cfg = agent_config(&name)?;
    cfg.fault_wait = args.fault_wait;
    cfg.container_timeout = args.container_timeout;
    let urls = tabula_agent::remote::follow::parse_list(controller)
        .map_err(anyhow::Error::msg)
        .context("--controller")?;
    let controller = urls.join(",");
    let remote = RemoteControl::new(
        &urls,
        args.fault_wait.max(std::time::Duration::from_secs(5)),
    )
    .map_err(anyhow::Error::msg)
    .context("--controller")?;
    let lease = remote.lease();
    let plane: Arc<dyn ControlPlane> = remote.clone();
    let agent = Agent::start_with_lease(cfg, plane, lease)
        .await
        .context("starting the agent")?;
    let nbd = bind_nbd(&args.nbd_listen).await?;
    info!(nbd = %nbd.local_addr_string(), controller, agent = name, "tabula agent ready");
    eprintln!(
        "tabula agent ready: {name}: NBD on {}, controller {controller}",
        nbd.local_addr_string()
    );
    // A controller unreachable at the start may refuse the name once it answers.
    tokio::select! {
        r = run_until_signal(None, Some((nbd, agent))) => r,
        why = remote.refused() => Err(anyhow::anyhow!(why)).context("the controller refused this agent"),
    }
}
