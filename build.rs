//! Compiles `proto/` with protox (pure Rust), so building needs no `protoc`.
//!
//! Writes the service stubs (over the messages the client crate generates,
//! `order_client::proto`, so there is one type per message) and the encoded
//! file descriptor set that server reflection serves, both into `OUT_DIR`.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations at build time; once this script prints
    // any rerun-if-changed line, cargo would otherwise miss a new migration.
    println!("cargo:rerun-if-changed=migrations");

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true).open_file("orders/v1/orders.proto")?;
    std::fs::write(out_dir.join("orders_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .extern_path(".orders.v1", "::order_client::proto")
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
