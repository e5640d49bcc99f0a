//! Architecture rules, checked from `cargo metadata`: only the HTTP crate knows axum; the
//! engine, ledger, receipts and core crates pull in no HTTP or network client; the upstream
//! crate knows no other tokenomy crate; nothing depends on the binary crate.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

fn direct_deps() -> BTreeMap<String, Vec<String>> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null()) // normal dependencies only
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn crates_respect_their_boundaries() {
    let deps = direct_deps();
    const NETWORK: &[&str] = &["axum", "hyper", "reqwest", "tower-http", "tokio-postgres", "deadpool-postgres"];
    for (krate, list) in &deps {
        if krate != "tokenomy-api" {
            assert!(!list.iter().any(|d| d == "axum"), "{krate} depends on axum: only tokenomy-api may");
        }
        if ["tokenomy-core", "tokenomy-engine", "tokenomy-receipts", "tokenomy-billing"].contains(&krate.as_str()) {
            let bad: Vec<&String> = list.iter().filter(|d| NETWORK.contains(&d.as_str())).collect();
            assert!(bad.is_empty(), "{krate} must do no network I/O but depends on {bad:?}");
        }
        assert!(!list.iter().any(|d| d == "tokenomy"), "{krate} depends on the binary crate");
        if krate == "tokenomy-upstream" {
            // It fetches tokens; what they cost and who pays is the HTTP crate's business.
            let bad: Vec<&String> = list.iter().filter(|d| d.starts_with("tokenomy-")).collect();
            assert!(bad.is_empty(), "tokenomy-upstream must know no other tokenomy crate, but depends on {bad:?}");
        }
    }
    assert!(deps.contains_key("tokenomy-api") && deps.contains_key("tokenomy-engine") && deps.contains_key("tokenomy-upstream"));
}
