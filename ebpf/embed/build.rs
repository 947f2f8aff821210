//! Builds `ebpf/programs` for the BPF target and copies the objects to OUT_DIR.
//!
//! Not aya-build: its 0.2 release fixes RUSTFLAGS, and the programs need
//! `-C target-cpu=v3` (atomic fetch and compare-exchange). The toolchain is
//! the one running this build (stable with RUSTC_BOOTSTRAP for build-std);
//! `scripts/bootstrap` installs rust-src and a bpf-linker on its LLVM.
#![allow(
    clippy::expect_used,
    reason = "a build script reports failure by panicking"
)]

use std::{
    env,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let ebpf_root = manifest.join("..");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    for dir in [
        "programs/src",
        "programs/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=QOS_BPF_LINKER");

    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").expect("CARGO_CFG_TARGET_ENDIAN");
    let target = if endian == "big" {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());

    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf_root)
        .args(["build", "--package", "qos-ebpf", "--bins", "--release"])
        .args([
            "--target",
            target,
            "-Z",
            "build-std=core",
            "--message-format=json",
        ])
        .arg("--target-dir")
        .arg(out.join("ebpf-target"))
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(key);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning cargo for the eBPF build: {e}"));
    let stderr = child.stderr.take().expect("stderr piped");
    let stderr = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut executables = Vec::new();
    let mut diagnostics = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("stdout piped")).lines() {
        let line = line.expect("reading cargo output");
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(exe), Some(name)) =
                    (msg["executable"].as_str(), msg["target"]["name"].as_str())
                {
                    executables.push((name.to_owned(), PathBuf::from(exe)));
                }
            }
            Some("compiler-message") => {
                if let Some(text) = msg["message"]["rendered"].as_str() {
                    diagnostics.push(text.to_owned());
                }
            }
            _ => {}
        }
    }
    let status = child.wait().expect("waiting for the eBPF build");
    let stderr = stderr.join().unwrap_or_default();
    for d in &diagnostics {
        for l in d.lines() {
            println!("cargo:warning={l}");
        }
    }
    if !status.success() {
        for l in &stderr {
            println!("cargo:warning={l}");
        }
        panic!(
            "building the eBPF programs failed ({status}); run scripts/bootstrap to install \
             rust-src and bpf-linker, then see the warnings above"
        );
    }
    for (name, exe) in executables {
        std::fs::copy(&exe, out.join(&name))
            .unwrap_or_else(|e| panic!("copying {} to OUT_DIR: {e}", exe.display()));
    }
}
