use super::*;
use nodemesh_config::AuthorizationPolicy;

fn policy(name: &str, spec: &str) -> AuthorizationPolicy {
    let text = format!(
        "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\n{spec}"
    );
    let policy: AuthorizationPolicy = serde_yaml::from_str(&text).expect("policy YAML");
    policy.validate().expect("valid policy");
    policy
}

fn dry_run(mut p: AuthorizationPolicy) -> AuthorizationPolicy {
    p.metadata
        .annotations
        .insert("nodemesh.dev/dry-run".into(), "true".into());
    p
}

fn mesh_peer() -> Peer {
    Peer::authenticated(
        "spiffe://cluster.local/ns/shop/sa/api",
        "10.88.1.2".parse().expect("ip"),
    )
}

fn legacy_peer() -> Peer {
    Peer::plaintext("10.88.1.250".parse().expect("ip"))
}

fn http(method: &str, path: &str) -> HttpAttributes {
    HttpAttributes {
        method: method.into(),
        path: path.into(),
        authority: Some("web.shop".into()),
        headers: vec![("x-tenant".into(), b"blue".to_vec())],
        ..HttpAttributes::default()
    }
}

fn compiled<'a>(policies: impl IntoIterator<Item = &'a AuthorizationPolicy>) -> WorkloadPolicies {
    WorkloadPolicies::new(policies, &TrustDomains::new("cluster.local", &[]))
}

fn request<'a>(peer: &'a Peer, port: u16, http: Option<&'a HttpAttributes>) -> Request<'a> {
    Request {
        peer,
        destination_ip: "10.88.2.2".parse().expect("ip"),
        destination_port: port,
        sni: None,
        http,
    }
}

/// (allowed, short reason) for compact tables.
fn outcome(
    policies: &[AuthorizationPolicy],
    peer: &Peer,
    port: u16,
    http: Option<&HttpAttributes>,
) -> (bool, String) {
    let decision = compiled(policies).decide(&request(peer, port, http));
    let reason = match &decision.reason {
        Reason::NoPolicy => "no policy".to_owned(),
        Reason::NoDenyMatched => "no deny matched".to_owned(),
        Reason::Allowed(v) => format!("allowed by {} rule {}", v.policy, v.rule),
        Reason::Denied(v) => format!("denied by {} rule {}", v.policy, v.rule),
        Reason::NoAllowMatched { .. } => "no allow matched".to_owned(),
    };
    (decision.allowed, reason)
}

const ALLOW_PUBLIC_GET: &str = "spec:\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        methods: [\"GET\"]\n        paths: [\"/public/*\"]\n";

#[test]
fn allow_public_get_only() {
    let p = [policy("public", ALLOW_PUBLIC_GET)];
    let peer = mesh_peer();
    let cases = [
        (
            http("GET", "/public/x"),
            (true, "allowed by shop/public rule 0"),
        ),
        (http("GET", "/private"), (false, "no allow matched")),
        (http("POST", "/public/x"), (false, "no allow matched")),
        (http("GET", "/public"), (false, "no allow matched")),
    ];
    for (request, (allowed, reason)) in cases {
        assert_eq!(
            outcome(&p, &peer, 8080, Some(&request)),
            (allowed, reason.to_owned()),
            "{} {}",
            request.method,
            request.path
        );
    }
    assert_eq!(
        outcome(&p, &peer, 9000, None),
        (false, "no allow matched".to_owned()),
        "TCP cannot satisfy an HTTP-only ALLOW rule"
    );
    assert!(compiled(&p).needs_http());
}

#[test]
fn deny_wins_over_allow_and_fails_closed_on_tcp() {
    let allow_all = policy("allow-all", "spec:\n  rules:\n  - {}\n");
    let deny_legacy = policy(
        "deny-legacy",
        "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [\"*\"]\n",
    );
    let deny_admin = policy(
        "deny-admin",
        "spec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]\n",
    );
    let p = [allow_all, deny_legacy, deny_admin];
    assert_eq!(
        outcome(&p, &mesh_peer(), 80, Some(&http("GET", "/x"))),
        (true, "allowed by shop/allow-all rule 0".into())
    );
    assert_eq!(
        outcome(&p, &legacy_peer(), 80, Some(&http("GET", "/x"))),
        (false, "denied by shop/deny-legacy rule 0".into())
    );
    assert_eq!(
        outcome(&p, &mesh_peer(), 80, Some(&http("GET", "/admin/users"))),
        (false, "denied by shop/deny-admin rule 0".into())
    );
    assert_eq!(
        outcome(&p, &mesh_peer(), 80, None),
        (false, "denied by shop/deny-admin rule 0".into()),
        "a DENY rule on paths applies to TCP, which cannot be checked"
    );
}

#[test]
fn empty_allow_denies_everything_and_empty_rule_allows_everything() {
    let deny_all = [policy("nothing", "spec: {}\n")];
    assert_eq!(
        outcome(&deny_all, &mesh_peer(), 80, None),
        (false, "no allow matched".into())
    );
    let allow_all = [policy("everything", "spec:\n  rules:\n  - {}\n")];
    assert_eq!(
        outcome(&allow_all, &legacy_peer(), 80, None),
        (true, "allowed by shop/everything rule 0".into())
    );
    assert_eq!(
        outcome(&[], &legacy_peer(), 80, None),
        (true, "no policy".into())
    );
}

#[test]
fn sources_match_principals_namespaces_and_addresses() {
    let p = |source: &str| {
        [policy(
            "p",
            &format!("spec:\n  rules:\n  - from:\n    - source:\n        {source}\n"),
        )]
    };
    let cases = [
        (
            "principals: [\"cluster.local/ns/shop/sa/api\"]",
            true,
            false,
        ),
        (
            "principals: [\"spiffe://cluster.local/ns/shop/sa/api\"]",
            false,
            false,
        ),
        ("principals: [\"cluster.local/ns/shop/*\"]", true, false),
        ("principals: [\"*\"]", true, false),
        ("notPrincipals: [\"*\"]", false, true),
        ("namespaces: [\"shop\"]", true, false),
        ("notNamespaces: [\"shop\"]", false, true),
        ("ipBlocks: [\"10.88.1.0/24\"]", true, true),
        ("ipBlocks: [\"10.88.1.2\"]", true, false),
        ("notIpBlocks: [\"10.88.1.250/32\"]", true, false),
    ];
    for (source, mesh, legacy) in cases {
        assert_eq!(
            outcome(&p(source), &mesh_peer(), 80, None).0,
            mesh,
            "mesh peer, {source}"
        );
        assert_eq!(
            outcome(&p(source), &legacy_peer(), 80, None).0,
            legacy,
            "legacy peer, {source}"
        );
    }
}

#[test]
fn operations_and_conditions() {
    let p = |rule: &str| [policy("p", &format!("spec:\n  rules:\n  - {rule}\n"))];
    let get = http("GET", "/a/b.png?x=1".split('?').next().unwrap_or_default());
    let cases = [
        ("to: [{operation: {ports: [\"8080\"]}}]", true),
        ("to: [{operation: {ports: [\"9090\"]}}]", false),
        ("to: [{operation: {notPorts: [\"8080\"]}}]", false),
        ("to: [{operation: {paths: [\"*.png\"]}}]", true),
        ("to: [{operation: {notPaths: [\"/a/*\"]}}]", false),
        ("to: [{operation: {hosts: [\"WEB.shop\"]}}]", true),
        (
            "to: [{operation: {methods: [\"POST\"]}}, {operation: {methods: [\"GET\"]}}]",
            true,
        ),
        (
            "when: [{key: \"request.headers[X-Tenant]\", values: [\"blue\"]}]",
            true,
        ),
        (
            "when: [{key: \"request.headers[x-tenant]\", notValues: [\"blue\"]}]",
            false,
        ),
        (
            "when: [{key: \"request.headers[x-missing]\", values: [\"*\"]}]",
            false,
        ),
        ("when: [{key: source.namespace, values: [\"shop\"]}]", true),
        ("when: [{key: source.ip, values: [\"10.0.0.0/8\"]}]", true),
        ("when: [{key: destination.port, values: [\"8080\"]}]", true),
        (
            "from: [{source: {namespaces: [\"shop\"]}}]\n    to: [{operation: {ports: [\"1\"]}}]",
            false,
        ),
    ];
    for (rule, allowed) in cases {
        assert_eq!(
            outcome(&p(rule), &mesh_peer(), 8080, Some(&get)).0,
            allowed,
            "{rule}"
        );
    }
}

#[test]
fn audit_and_dry_run_report_without_deciding() {
    let audit = policy("audit-all", "spec:\n  action: AUDIT\n  rules:\n  - {}\n");
    let would_deny = dry_run(policy(
        "would-deny",
        "spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"shop\"]\n",
    ));
    let peer = mesh_peer();
    let decision = compiled([&audit, &would_deny]).decide(&request(&peer, 80, None));
    assert!(
        decision.allowed,
        "neither AUDIT nor a dry-run policy decides"
    );
    assert_eq!(
        decision.audited,
        [Verdict {
            policy: "shop/audit-all".into(),
            rule: 0
        }]
    );
    let shadow = decision.dry_run.expect("a dry-run policy applies");
    assert!(!shadow.allowed);
    assert_eq!(
        shadow.reason,
        Reason::Denied(Verdict {
            policy: "shop/would-deny".into(),
            rule: 0
        })
    );
}

#[test]
fn explain_gives_the_reason_of_every_rule() {
    let p = [policy("public", ALLOW_PUBLIC_GET)];
    let compiled = compiled(&p);
    let peer = mesh_peer();
    let post = http("POST", "/private");
    let explanation = compiled.explain(&request(&peer, 8080, Some(&post)));
    assert!(!explanation.decision.allowed);
    let rule = &explanation.policies[0].rules[0];
    assert!(!rule.matched);
    assert_eq!(
        rule.reasons,
        ["to[0].operation.methods: POST is not in [GET]"]
    );

    let tcp = compiled.explain(&request(&peer, 9000, None));
    assert!(
        tcp.policies[0].rules[0].reasons[0].contains("not HTTP"),
        "{:?}",
        tcp.policies[0].rules[0]
    );
}

/// A policy that does not validate (as an agent may receive from a newer controller) never
/// widens an ALLOW: the rule matches nothing, where dropping the unreadable value would have
/// matched every address.
#[test]
fn an_invalid_allow_policy_matches_nothing() {
    let text = "apiVersion: security.nodemesh.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: odd\n  namespace: shop\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"not-an-address\"]\n";
    let odd: AuthorizationPolicy = serde_yaml::from_str(text).expect("policy YAML");
    assert!(odd.validate().is_err());
    assert_eq!(
        outcome(std::slice::from_ref(&odd), &mesh_peer(), 80, None),
        (false, "no allow matched".into())
    );
    let mut deny = odd;
    deny.spec.action = nodemesh_config::Action::Deny;
    assert_eq!(
        outcome(&[deny], &mesh_peer(), 80, None),
        (false, "denied by shop/odd rule 0".into()),
        "a DENY rule without its unreadable values matches more"
    );
}
