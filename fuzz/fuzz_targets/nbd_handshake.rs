//! Feeds arbitrary bytes as the client side of a whole connection to
//! `serve_connection` (over `tokio::io::duplex`, against the in-memory
//! export). The server must neither panic nor hang: the run is bounded by a
//! timeout, and the handshake timeout is short.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tabula_nbd::server::mem::{MemExport, StaticProvider};
use tabula_nbd::server::{ExportInfo, ServerConfig, serve_connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut info = ExportInfo::new(64 << 10);
        info.can_fast_zero = true;
        let provider = Arc::new(
            StaticProvider::new()
                .with("", Arc::new(MemExport::new(info.clone())))
                .with("disk", Arc::new(MemExport::new(info))),
        );
        let cfg = Arc::new(ServerConfig {
            max_payload: 64 << 10,
            max_in_flight: 8,
            max_in_flight_bytes: 256 << 10,
            max_option_len: 4096,
            option_timeout: Duration::from_millis(500),
            max_options: 64,
            options_per_export: 4,
        });
        let (client, server) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(serve_connection(server, provider, cfg));
        let (mut rd, mut wr) = tokio::io::split(client);
        // Drain server output concurrently so it never blocks on a full pipe.
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let _ = wr.write_all(data).await;
        // EOF after the input: the server must finish on its own.
        let _ = wr.shutdown().await;
        let outcome = tokio::time::timeout(Duration::from_secs(5), task).await;
        let joined = outcome.expect("serve_connection hung");
        joined.expect("serve_connection panicked").ok();
        drain.abort();
    });
});
