use super::*;

use PathNormalization::{Base, DecodeAndMergeSlashes, MergeSlashes, None as Raw};

fn normal(path: &str, mode: PathNormalization) -> String {
    normalize_path(path, mode)
        .unwrap_or_else(|e| panic!("{path:?} under {mode:?}: {e}"))
        .into_owned()
}

#[test]
fn dot_segments_are_removed_also_when_escaped() {
    let cases = [
        ("/public/../private", "/private"),
        ("/public/%2e%2e/private", "/private"),
        ("/public/%2E%2E/private", "/private"),
        ("/public/.%2e/private", "/private"),
        ("/./private", "/private"),
        ("/a/b/./c", "/a/b/c"),
        ("/a/b/../c", "/a/c"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../a", "/a"),
        ("/a/..b/c", "/a/..b/c"),
        ("/a/.b", "/a/.b"),
        ("/", "/"),
    ];
    for (path, expected) in cases {
        assert_eq!(normal(path, Base), expected, "{path}");
    }
}

#[test]
fn unreserved_escapes_are_decoded_and_the_others_kept_as_written() {
    let cases = [
        ("/%70rivate", "/private"),
        ("/%7Euser/%41%2d%5F", "/~user/A-_"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2fb"),
        ("/a%5cb", "/a%5cb"),
        ("/a%20b", "/a%20b"),
        ("/a%3fb", "/a%3fb"),
        ("/caf%C3%A9", "/caf%C3%A9"),
        ("/a%zz", "/a%zz"),
        ("/a%2", "/a%2"),
        ("/%%32%65", "/%252e"),
        ("/a\"b{c}", "/a%22b%7Bc%7D"),
        ("/caf\u{e9}", "/caf%C3%A9"),
    ];
    for (path, expected) in cases {
        assert_eq!(normal(path, Base), expected, "{path}");
    }
}

#[test]
fn backslashes_are_slashes() {
    assert_eq!(normal("/public\\..\\private", Base), "/private");
    assert_eq!(normal("/a\\b", Base), "/a/b");
}

#[test]
fn slashes_merge_only_when_asked() {
    assert_eq!(normal("//a//b", Base), "//a//b");
    assert_eq!(normal("//a//b", MergeSlashes), "/a/b");
    assert_eq!(normal("/a//../b", MergeSlashes), "/a/b");
    assert_eq!(normal("/a%2F%2Fb", MergeSlashes), "/a%2F%2Fb");
    assert_eq!(normal("//a//b//", MergeSlashes), "/a/b/");
}

#[test]
fn encoded_slashes_separate_segments_only_when_decoded() {
    assert_eq!(
        normal("/public%2F..%2Fprivate", Base),
        "/public%2F..%2Fprivate"
    );
    assert_eq!(
        normal("/public%2F..%2Fprivate", DecodeAndMergeSlashes),
        "/private"
    );
    assert_eq!(normal("/a%5C..%5Cb", DecodeAndMergeSlashes), "/b");
    assert_eq!(normal("/a%2f%2fb", DecodeAndMergeSlashes), "/a/b");
}

#[test]
fn case_is_kept() {
    assert_eq!(normal("/PRIVATE", DecodeAndMergeSlashes), "/PRIVATE");
    assert_eq!(normal("/%50rivate", Base), "/Private");
    assert_eq!(normal("/a%2fB", Base), "/a%2fB");
}

#[test]
fn none_leaves_everything() {
    for path in ["/public/../private", "/%70rivate", "//a", "a\\b"] {
        assert_eq!(normal(path, Raw), path);
    }
}

#[test]
fn normal_paths_are_borrowed() {
    for path in ["/", "/a/b", "/a.b/c.", "/api/v1/items"] {
        assert!(matches!(
            normalize_path(path, MergeSlashes),
            Ok(Cow::Borrowed(_))
        ));
    }
}

/// The expectations of Istio's path normalisation integration test, mode by mode.
#[test]
fn istio_normalisation_table() {
    let same = "";
    let cases: [(&str, [&str; 3]); 12] = [
        ("/app/../admin", ["/admin", "/admin", "/admin"]),
        ("/app//", [same, "/app/", "/app/"]),
        ("/app/%2f", [same, same, "/app/"]),
        ("/app%2f/", [same, same, "/app/"]),
        (
            "/xyz%30..//abc",
            ["/xyz0..//abc", "/xyz0../abc", "/xyz0../abc"],
        ),
        ("/app/%2E./admin", ["/admin", "/admin", "/admin"]),
        ("/app\\admin", ["/app/admin", "/app/admin", "/app/admin"]),
        (
            "/app/\\/\\/\\admin",
            ["/app//////admin", "/app/admin", "/app/admin"],
        ),
        ("/%2Fapp%5cadmin%5Cabc", [same, same, "/app/admin/abc"]),
        (
            "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
            [
                "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                "/%5Capp%2f%5c%2F..%2fadmin%5c/abc",
                "/app/admin/abc",
            ],
        ),
        ("/app//../admin", ["/app/admin", "/app/admin", "/app/admin"]),
        ("/app//../../admin", ["/admin", "/admin", "/admin"]),
    ];
    for (path, expected) in cases {
        for (mode, want) in [Base, MergeSlashes, DecodeAndMergeSlashes]
            .iter()
            .zip(expected)
        {
            let want = if want.is_empty() { path } else { want };
            assert_eq!(normal(path, *mode), want, "{path} under {mode:?}");
        }
    }
    assert_eq!(
        normal("/%c0%2e%c0%2e/admin", DecodeAndMergeSlashes),
        "/%c0.%c0./admin"
    );
    assert_eq!(normal("/%c0%2fadmin", DecodeAndMergeSlashes), "/%c0/admin");
    for untouched in [
        "/.../admin",
        "/..;/admin",
        "/;/admin",
        "/admin;a=b",
        "/Admin",
        "/%252e%252e/admin",
    ] {
        assert_eq!(normal(untouched, DecodeAndMergeSlashes), untouched);
    }
}

#[test]
fn paths_that_cannot_be_normalised_are_refused() {
    for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
        assert_eq!(normalize_path("/admin%00", mode), Err(InvalidRequest::Nul));
    }
    assert_eq!(normal("/admin%00", Raw), "/admin%00");
    assert_eq!(
        normalize_path("a/b", Base),
        Err(InvalidRequest::NotAbsolute)
    );
    assert_eq!(normal("*", Base), "*");
}

#[test]
fn normalising_twice_changes_nothing() {
    let paths = [
        "/public/%2e%2e/private",
        "/a%2F..%2Fb",
        "//x/./y/../z",
        "/\\a\\..\\b",
        "/%7e/%2f",
    ];
    for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
        for path in paths {
            let once = normal(path, mode);
            assert_eq!(normal(&once, mode), once, "{path} under {mode:?}");
        }
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Paths made of the pieces that normalisation cares about.
    fn paths() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just("%"),
            Just("%2e"),
            Just("%2E"),
            Just("%2f"),
            Just("%5C"),
            Just("%25"),
            Just("%41"),
            Just("%7e"),
            Just("%zz"),
            Just("\\"),
            Just("a"),
            Just("b"),
            Just("é"),
            Just("{"),
            Just("2"),
            Just("e"),
        ];
        prop::collection::vec(piece, 0..24).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    fn modes() -> impl Strategy<Value = PathNormalization> {
        prop_oneof![Just(Base), Just(MergeSlashes), Just(DecodeAndMergeSlashes)]
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_segment(path in paths(), mode in modes()) {
            let Ok(once) = normalize_path(&path, mode) else {
                return Ok(());
            };
            let twice = normalize_path(&once, mode).expect("a normal path normalises");
            prop_assert_eq!(&*twice, &*once, "{} under {:?}", path, mode);
            prop_assert!(once.starts_with('/'));
            for segment in once.split('/') {
                prop_assert!(segment != "." && segment != "..", "{} gave {}", path, once);
            }
            if mode != Base {
                prop_assert!(!once.contains("//"), "{} gave {}", path, once);
            }
            if mode == DecodeAndMergeSlashes {
                let lower = once.to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c"), "{} gave {}", path, once);
            }
        }

        #[test]
        fn any_text_is_normalised_or_refused_without_panicking(path in "\\PC*", mode in modes()) {
            let _ = normalize_path(&path, mode);
        }
    }
}
