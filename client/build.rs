//! Compiles `../proto` with protox (pure Rust), so building needs no
//! `protoc`: the messages and the client stubs. The server crate generates
//! only its service stubs, over these messages.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let mut compiler = protox::Compiler::new(["../proto"])?;
    compiler.include_imports(true).include_source_info(true).open_file("orders/v1/orders.proto")?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
