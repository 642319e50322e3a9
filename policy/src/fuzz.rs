//! Fuzz target for the policy matcher (`cargo xtask fuzz`): random policies, each that
//! validates compiled, judged against random requests. Whatever the input, judging does not
//! panic, `explain` gives the verdict `decide` gives, and Istio's order holds: a matching DENY
//! always denies, so adding a DENY policy never allows what was denied.

use proptest::prelude::*;

use super::*;
use nodemesh_config::AuthorizationPolicy;

fn one_of(items: &'static [&'static str]) -> impl Strategy<Value = &'static str> {
    proptest::sample::select(items)
}

/// A YAML list of 1 to 3 values drawn from `items`.
fn list(items: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop::collection::vec(one_of(items), 1..3).prop_map(|v| {
        format!(
            "[{}]",
            v.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

const PRINCIPALS: &[&str] = &[
    "*",
    "cluster.local/ns/shop/sa/api",
    "cluster.local/ns/shop/*",
    "*/sa/api",
    "spiffe://cluster.local/ns/shop/sa/api",
    "",
];
const NAMESPACES: &[&str] = &["shop", "sh*", "*op", "*", "other", ""];
const BLOCKS: &[&str] = &[
    "10.88.1.0/24",
    "10.88.1.2",
    "0.0.0.0/0",
    "10.0.0.0/8",
    "::/0",
    "bad",
];
const METHODS: &[&str] = &["GET", "POST", "*", "get", "PUT"];
const PATHS: &[&str] = &[
    "/", "/admin", "/admin/*", "*", "*/x", "/a/{*}/b", "/a/{**}", "/{*}",
];
const PORTS: &[&str] = &["80", "8080", "9000", "0", "65536", "x"];
const HOSTS: &[&str] = &["web.shop", "web.shop:*", "*.shop", "*", "WEB.SHOP"];
const KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "request.headers[x-tenant]",
    "destination.port",
    "connection.sni",
    "remote.ip",
];
const VALUES: &[&str] = &[
    "10.88.1.2",
    "shop",
    "blue",
    "9000",
    "*",
    "web.shop",
    "10.0.0.0/8",
];

fn source() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        list(PRINCIPALS).prop_map(|l| format!("principals: {l}")),
        list(PRINCIPALS).prop_map(|l| format!("notPrincipals: {l}")),
        list(NAMESPACES).prop_map(|l| format!("namespaces: {l}")),
        list(NAMESPACES).prop_map(|l| format!("notNamespaces: {l}")),
        list(BLOCKS).prop_map(|l| format!("ipBlocks: {l}")),
        list(BLOCKS).prop_map(|l| format!("notIpBlocks: {l}")),
    ];
    prop::collection::vec(field, 1..3).prop_map(|f| format!("{{{}}}", f.join(", ")))
}

fn operation() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        list(METHODS).prop_map(|l| format!("methods: {l}")),
        list(PATHS).prop_map(|l| format!("paths: {l}")),
        list(PATHS).prop_map(|l| format!("notPaths: {l}")),
        list(PORTS).prop_map(|l| format!("ports: {l}")),
        list(HOSTS).prop_map(|l| format!("hosts: {l}")),
    ];
    prop::collection::vec(field, 1..3).prop_map(|f| format!("{{{}}}", f.join(", ")))
}

fn condition() -> impl Strategy<Value = String> {
    (one_of(KEYS), list(VALUES)).prop_map(|(k, v)| format!("{{key: {k:?}, values: {v}}}"))
}

fn rule() -> impl Strategy<Value = String> {
    (
        prop::option::of(prop::collection::vec(source(), 1..2)),
        prop::option::of(prop::collection::vec(operation(), 1..2)),
        prop::option::of(prop::collection::vec(condition(), 1..2)),
    )
        .prop_map(|(from, to, when)| {
            let mut parts = Vec::new();
            if let Some(from) = from {
                let from: Vec<String> = from
                    .into_iter()
                    .map(|s| format!("{{source: {s}}}"))
                    .collect();
                parts.push(format!("from: [{}]", from.join(", ")));
            }
            if let Some(to) = to {
                let to: Vec<String> = to
                    .into_iter()
                    .map(|o| format!("{{operation: {o}}}"))
                    .collect();
                parts.push(format!("to: [{}]", to.join(", ")));
            }
            if let Some(when) = when {
                parts.push(format!("when: [{}]", when.join(", ")));
            }
            format!("{{{}}}", parts.join(", "))
        })
}

/// A policy that validates, or `None`.
fn policy(
    index: usize,
    action: &str,
    rules: &[String],
    dry_run: bool,
) -> Option<AuthorizationPolicy> {
    let annotations = if dry_run {
        "  annotations: {\"istio.io/dry-run\": \"true\"}\n"
    } else {
        ""
    };
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p{index}\n  \
         namespace: shop\n{annotations}spec:\n  action: {action}\n  rules: [{}]\n",
        rules.join(", ")
    );
    let policy: AuthorizationPolicy = serde_yaml::from_str(&text).ok()?;
    policy.validate().ok()?;
    Some(policy)
}

fn policies() -> impl Strategy<Value = Vec<AuthorizationPolicy>> {
    let one = (
        one_of(&["ALLOW", "DENY", "AUDIT"]),
        prop::collection::vec(rule(), 0..3),
        proptest::bool::weighted(0.2),
    );
    prop::collection::vec(one, 0..4).prop_map(|all| {
        all.iter()
            .enumerate()
            .filter_map(|(i, (action, rules, dry))| policy(i, action, rules, *dry))
            .collect()
    })
}

fn http() -> impl Strategy<Value = Option<HttpAttributes>> {
    prop::option::of(
        (
            one_of(&["GET", "POST", "get", "PUT"]),
            one_of(&["/", "/admin", "/admin/x", "/a/b/b", "/a/x/y/b", "/x"]),
            prop::option::of(one_of(&[
                "web.shop",
                "web.shop:80",
                "WEB.shop",
                "api.other",
            ])),
            prop::option::of(one_of(&["blue", "red", ""])),
        )
            .prop_map(|(method, path, authority, tenant)| HttpAttributes {
                method: method.into(),
                path: path.into(),
                authority: authority.map(str::to_owned),
                headers: tenant
                    .map(|t| vec![("x-tenant".to_owned(), t.as_bytes().to_vec())])
                    .unwrap_or_default(),
                ..HttpAttributes::default()
            }),
    )
}

fn peer() -> impl Strategy<Value = Peer> {
    let ip = one_of(&["10.88.1.2", "10.88.2.9", "192.168.0.1"])
        .prop_map(|ip| ip.parse::<IpAddr>().expect("address"));
    (
        prop::option::of(one_of(&[
            "spiffe://cluster.local/ns/shop/sa/api",
            "spiffe://cluster.local/ns/other/sa/web",
            "spiffe://other.domain/ns/shop/sa/api",
        ])),
        ip,
    )
        .prop_map(|(id, ip)| match id {
            Some(id) => Peer::authenticated(id, ip),
            None => Peer::plaintext(ip),
        })
}

proptest! {
    #[test]
    fn fuzz_policy_matcher(
        policies in policies(),
        extra_deny in prop::collection::vec(rule(), 1..3),
        peer in peer(),
        http in http(),
        port in one_of(&["80", "9000", "8080"]),
        sni in prop::option::of(one_of(&["web.shop", "WEB.SHOP", "x"])),
    ) {
        let trust = TrustDomains::new("cluster.local", &[]);
        let req = Request {
            peer: &peer,
            destination_ip: "10.88.1.3".parse().expect("address"),
            destination_port: port.parse().expect("port"),
            sni,
            http: http.as_ref(),
        };
        let compiled = WorkloadPolicies::new(&policies, &trust);
        let decision = compiled.decide(&req);
        let explained = compiled.explain(&req);
        prop_assert_eq!(explained.decision.allowed, decision.allowed, "explain and decide disagree");

        if let Some(deny) = policy(99, "DENY", &extra_deny, false) {
            let mut more = policies.clone();
            more.push(deny);
            let stricter = WorkloadPolicies::new(&more, &trust).decide(&req);
            prop_assert!(
                decision.allowed || !stricter.allowed,
                "a DENY policy allowed what was denied"
            );
        }
    }
}

#[test]
fn the_generator_makes_valid_policies() {
    let rule = "{from: [{source: {principals: [\"*\"], namespaces: [\"shop\"]}}], to: [{operation: {methods: [\"GET\"], paths: [\"/admin/*\"], ports: [\"80\"]}}], when: [{key: \"source.ip\", values: [\"10.88.1.2\"]}]}";
    assert!(policy(0, "ALLOW", &[rule.to_owned()], false).is_some());
    assert!(policy(0, "DENY", &[rule.to_owned()], true).is_some());
    // A good share of what the generator makes validates, so the fuzzing judges policies.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = policies();
    let (mut made, mut valid) = (0, 0);
    for _ in 0..200 {
        let tree = strategy.new_tree(&mut runner).expect("value");
        let count = proptest::strategy::ValueTree::current(&tree).len();
        valid += count;
        made += 1;
    }
    assert!(valid * 2 > made, "{valid} valid policies in {made} sets");
}
