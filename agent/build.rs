//! Links the optimised agent with its functions in the order `layout.order` gives: those an
//! idle agent runs first, packed together, then those its loads run, then the rest. Code pages
//! are mapped 64 KiB around each one touched, so scattered start-up and housekeeping code
//! otherwise keeps most of the binary resident in every agent. `cargo xtask layout` writes the
//! file from a traced run; names it no longer finds (after code or dependency changes) are
//! skipped silently and only cost memory, which `cargo xtask bench` reports.
//!
//! Release builds only, with rustc's default linker on x86-64 Linux (LLD, which takes
//! `--symbol-ordering-file`): not when the build names another linker. NODEMESH_LINK_ORDER=0
//! turns it off.

use std::{env, path::Path};

fn main() {
    println!("cargo:rerun-if-env-changed=NODEMESH_LINK_ORDER");
    let flags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let default_linker = env::var_os("RUSTC_LINKER").is_none()
        && !["linker", "link-self-contained", "fuse-ld"]
            .iter()
            .any(|f| flags.contains(f));
    let wanted = env::var("PROFILE").as_deref() == Ok("release")
        && env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
        && env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("x86_64")
        && default_linker
        && env::var("NODEMESH_LINK_ORDER").as_deref() != Ok("0");
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = Path::new(&dir).join("layout.order");
    if !order.exists() {
        // Run again when one appears (cargo scans the crate's directory).
        println!("cargo:rerun-if-changed=.");
        return;
    }
    println!("cargo:rerun-if-changed=layout.order");
    if wanted {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
