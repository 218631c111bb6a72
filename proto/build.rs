//! Generates the geomx gRPC API from `geomx/v1/*.proto` with a vendored protoc
//! (a `PROTOC` environment variable overrides it).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "geomx/v1/types.proto",
        "geomx/v1/agent.proto",
        "geomx/v1/user.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");

    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("geomx_descriptor.bin"))
        .btree_map(".")
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
