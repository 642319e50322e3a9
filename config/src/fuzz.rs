//! Fuzz target for the configuration loader (`cargo xtask fuzz`): the example files and a
//! sandbox-like configuration, mutated at random (bytes replaced, dropped, repeated, pieces of
//! YAML spliced in). Whatever the text, the loader answers with a configuration or with errors
//! that name the file, and never panics; what it accepts it accepts again the same.

use std::path::Path;

use proptest::prelude::*;

use crate::load_str;

const SEEDS: &[&str] = &[
    include_str!("../../examples/policies/web-service.yaml"),
    include_str!("../../examples/policies/public-get.yaml"),
    include_str!("../../examples/policies/deny-legacy.yaml"),
    include_str!("../../examples/policies/namespace-strict.yaml"),
    include_str!("../../examples/policies/egress-deny.yaml"),
    include_str!("../../examples/traffic/canary.yaml"),
    include_str!("../../examples/traffic/resilience.yaml"),
    include_str!("../../examples/traffic/rate-limit.yaml"),
    include_str!("../../examples/traffic/services.yaml"),
    "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    nodemesh.dev/enabled: \"true\"\n---\napiVersion: nodemesh.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: web\n  namespace: default\n  labels:\n    app: web\nspec:\n  node: n1\n  netns: /run/netns/web\n  ip: 10.88.1.2\n  serviceAccount: web\n",
];

/// Pieces of YAML and of the mesh's vocabulary to splice in.
const PIECES: &[&str] = &[
    "\n---\n",
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "\"",
    "'",
    "&a ",
    "*a",
    "!!str ",
    "<<: *a\n",
    "\n  ",
    "~",
    "null",
    "0x10",
    "1e9",
    "-1",
    "4294967296",
    "\u{0}",
    "é",
    "\t",
    "#",
    "kind: ",
    "apiVersion: ",
    "metadata:",
    "spec:",
    "name: ",
    "namespace: ",
    "rules:",
    "action: DENY",
    "mode: STRICT",
    "weight: ",
    "backendRefs:",
    "matches:",
    "paths:",
    "selector:",
    "targetRefs:",
    "ip: ",
    "10.88.1.2",
    "/24",
    "timeout: 1s",
    "retry:",
];

#[derive(Debug, Clone)]
enum Edit {
    Replace(usize, u8),
    Drop(usize, usize),
    Repeat(usize, usize),
    Splice(usize, &'static str),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Replace(at, b)),
        (any::<usize>(), 1usize..16).prop_map(|(at, n)| Edit::Drop(at, n)),
        (any::<usize>(), 1usize..32).prop_map(|(at, n)| Edit::Repeat(at, n)),
        (any::<usize>(), proptest::sample::select(PIECES)).prop_map(|(at, p)| Edit::Splice(at, p)),
    ];
    prop::collection::vec(edit, 0..6)
}

fn apply(seed: &str, edits: &[Edit]) -> String {
    let mut bytes = seed.as_bytes().to_vec();
    for edit in edits {
        let len = bytes.len().max(1);
        match *edit {
            Edit::Replace(at, b) => {
                if let Some(byte) = bytes.get_mut(at % len) {
                    *byte = b;
                }
            }
            Edit::Drop(at, n) => {
                let start = (at % len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                bytes.drain(start..end);
            }
            Edit::Repeat(at, n) => {
                let start = (at % len).min(bytes.len());
                let end = (start + n).min(bytes.len());
                let copy = bytes[start..end].to_vec();
                bytes.splice(end..end, copy);
            }
            Edit::Splice(at, piece) => {
                let at = (at % len).min(bytes.len());
                bytes.splice(at..at, piece.bytes());
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #[test]
    fn fuzz_config_loader(seeds in proptest::sample::subsequence(SEEDS, 1..=SEEDS.len()), edits in edits()) {
        let text = apply(&seeds.join("\n---\n"), &edits);
        let name = Path::new("fuzz.yaml");
        match load_str(name, &text) {
            Ok(config) => {
                let again = load_str(name, &text).expect("accepted once, accepted again");
                prop_assert_eq!(format!("{again:?}"), format!("{config:?}"));
            }
            Err(errors) => {
                prop_assert!(!errors.0.is_empty(), "refused without a reason");
                for error in &errors.0 {
                    prop_assert_eq!(&error.file, name);
                    prop_assert!(!error.message.is_empty());
                }
            }
        }
    }
}

#[test]
fn the_seeds_together_load_as_they_are() {
    let all = SEEDS.join("\n---\n");
    load_str(Path::new("seed.yaml"), &all).unwrap_or_else(|e| panic!("{e}"));
}
