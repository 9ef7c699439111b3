//! Compiles `proto/**/*.proto` with protox (a pure-Rust protobuf compiler), so building shopmesh
//! needs no system `protoc`.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Relative to this package, read when the script runs: cargo names a workspace member's
    // artifacts by its path within the workspace, so clones at other places (CI's, a worktree)
    // sharing one target directory share this script and its output. An absolute path (from
    // `env!` at the script's compile time, or printed for `rerun-if-changed`) would have a
    // clone read, and watch, another clone's protos.
    let relative = Path::new("../../../proto");
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR")?).join(relative);
    let mut files = Vec::new();
    collect(&root, &mut files)?;
    files.sort();
    for file in &files {
        let watched = relative.join(file.strip_prefix(&root)?);
        println!("cargo:rerun-if-changed={}", watched.display());
    }
    println!("cargo:rerun-if-changed={}", relative.display());
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}
