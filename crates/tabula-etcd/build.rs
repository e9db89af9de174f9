//! Compiles etcd's .proto files with protox (pure Rust), so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let mut fds = protox::compile(["etcd/api/etcdserverpb/rpc.proto"], ["proto"])?;
    // Generate only etcd's own messages (the google/api and openapiv2 imports carry HTTP
    // gateway annotations, nothing the client sends) and only the services we call.
    fds.file
        .retain(|f| matches!(f.package(), "etcdserverpb" | "mvccpb" | "authpb"));
    for file in &mut fds.file {
        file.service.retain(|s| {
            matches!(
                s.name(),
                "KV" | "Watch" | "Lease" | "Maintenance" | "Cluster"
            )
        });
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
