//! Generates the role-to-role gRPC code from proto/natter_rpc.proto with
//! protox (a protobuf compiler in Rust): building natter needs no `protoc`.

fn main() {
    println!("cargo:rerun-if-changed=proto/natter_rpc.proto");
    let files = match protox::compile(["proto/natter_rpc.proto"], ["proto"]) {
        Ok(files) => files,
        Err(e) => panic!("proto/natter_rpc.proto: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure().compile_fds(files) {
        panic!("generating the gRPC code: {e}");
    }
}
