//! The authorization parity suite (`policy/parity/authorization.yaml`): Istio's documented
//! verdicts as data, read here for the policy crate's unit tests and for the namespaced test
//! that puts the same cases to the proxy and to `nodemesh explain`.

use std::{net::Ipv4Addr, path::Path};

use nodemesh_config::{MeshConfig, load_str};
use serde::Deserialize;

use crate::{HttpAttributes, PathExplanation, Question, Step, explain_path};

/// The suite's text.
pub const SUITE: &str = include_str!("../parity/authorization.yaml");

/// The client in the mesh, the plaintext client, and the destination, as the sandbox lays
/// them out.
pub const MESH_CLIENT: (&str, Ipv4Addr) = ("n1-p1", Ipv4Addr::new(10, 88, 1, 2));
pub const LEGACY_CLIENT: (&str, Ipv4Addr) = ("n1-legacy", Ipv4Addr::new(10, 88, 1, 250));
pub const DESTINATION: (&str, Ipv4Addr) = ("n2-p1", Ipv4Addr::new(10, 88, 2, 2));
pub const HTTP_PORT: u16 = 8080;
pub const TCP_PORT: u16 = 9000;

/// The sandbox's workloads, for judging without it.
const SANDBOX_LIKE: &str = "apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {nodemesh.dev/enabled: \"true\"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: n1-p1, namespace: default, labels: {app: n1-p1}}
spec: {node: n1, netns: /run/netns/n1-p1, ip: 10.88.1.2, serviceAccount: n1-p1}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: n1-legacy, namespace: legacy, labels: {app: n1-legacy}}
spec: {node: n1, netns: /run/netns/n1-legacy, ip: 10.88.1.250, serviceAccount: default}
---
apiVersion: nodemesh.dev/v1alpha1
kind: Workload
metadata: {name: n2-p1, namespace: default, labels: {app: n2-p1}}
spec: {node: n2, netns: /run/netns/n2-p1, ip: 10.88.2.2, serviceAccount: n2-p1}
";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub group: String,
    /// YAML documents put in force for this group alone.
    pub config: String,
    pub cases: Vec<Case>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    Allow,
    Deny,
    /// 400: the path cannot be normalised.
    Bad,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum From {
    #[default]
    Mesh,
    Legacy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[serde(default)]
    pub from: From,
    #[serde(default)]
    pub tcp: bool,
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    pub sni: Option<String>,
    pub expect: Expect,
}

/// Every group of the suite.
pub fn groups() -> Vec<Group> {
    serde_yaml::from_str(SUITE).unwrap_or_else(|e| panic!("the parity suite does not parse: {e}"))
}

/// `\xNN` escapes in a header value, as bytes.
pub fn header_bytes(value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = value.as_bytes();
    while let Some((&b, more)) = rest.split_first() {
        if b == b'\\'
            && more.first() == Some(&b'x')
            && let Some(byte) = more
                .get(1..3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            rest = &more[3..];
            continue;
        }
        out.push(b);
        rest = more;
    }
    out
}

impl Group {
    /// The sandbox's workloads and this group's configuration, loaded.
    pub fn mesh(&self) -> MeshConfig {
        load_str(
            Path::new(&format!("{}.yaml", self.group)),
            &format!("{SANDBOX_LIKE}---\n{}", self.config),
        )
        .unwrap_or_else(|e| panic!("group {}: configuration refused:\n{e}", self.group))
    }
}

impl Case {
    pub fn client(&self) -> (&'static str, Ipv4Addr) {
        match self.from {
            From::Mesh => MESH_CLIENT,
            From::Legacy => LEGACY_CLIENT,
        }
    }

    pub fn port(&self) -> u16 {
        if self.tcp { TCP_PORT } else { HTTP_PORT }
    }

    /// The path as the client sends it.
    pub fn target(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// `:authority` as curl sends it unless the case names one.
    pub fn authority(&self) -> String {
        self.host
            .clone()
            .unwrap_or_else(|| format!("{}:{HTTP_PORT}", DESTINATION.1))
    }

    /// The request's HTTP attributes as the client sends them; `None` on TCP.
    pub fn http(&self) -> Option<HttpAttributes> {
        if self.tcp {
            return None;
        }
        let (path, query) = match self.target().split_once('?') {
            Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
            None => (self.target().to_owned(), None),
        };
        Some(HttpAttributes {
            method: self.method.clone().unwrap_or_else(|| "GET".to_owned()),
            path,
            query,
            authority: Some(self.authority()),
            scheme: Some("http".to_owned()),
            headers: self
                .headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), header_bytes(v)))
                .collect(),
        })
    }

    /// What `nodemesh explain` makes of the case.
    pub fn explain(&self, mesh: &MeshConfig) -> PathExplanation {
        let http = self.http();
        explain_path(
            mesh,
            nodemesh_config::DEFAULT_TRUST_DOMAIN,
            Question {
                source: self.client().1,
                destination: DESTINATION.1,
                port: self.port(),
                http: http.as_ref(),
                sni: self.sni.as_deref(),
            },
        )
    }

    /// The verdict an explanation gives.
    pub fn verdict(explanation: &PathExplanation) -> Expect {
        match explanation.step {
            Step::InvalidRequest { .. } => Expect::Bad,
            _ if explanation.allowed => Expect::Allow,
            _ => Expect::Deny,
        }
    }

    /// One line naming the case, for failures.
    pub fn describe(&self) -> String {
        format!(
            "{:?} {}{} {} host={} headers={:?} sni={:?}",
            self.from,
            if self.tcp { "TCP" } else { "" },
            self.method
                .as_deref()
                .unwrap_or(if self.tcp { "" } else { "GET" }),
            if self.tcp { "" } else { self.target() },
            self.authority(),
            self.headers,
            self.sni
        )
    }
}

/// A TLS ClientHello naming `name`, as a client's first bytes.
pub fn client_hello(name: &str) -> Vec<u8> {
    let n = u16::try_from(name.len()).unwrap_or(0);
    let mut list = vec![0u8];
    list.extend_from_slice(&n.to_be_bytes());
    list.extend_from_slice(name.as_bytes());
    let list_len = u16::try_from(list.len()).unwrap_or(0);
    let mut extensions = vec![0x00, 0x00];
    extensions.extend_from_slice(&(list_len + 2).to_be_bytes());
    extensions.extend_from_slice(&list_len.to_be_bytes());
    extensions.extend_from_slice(&list);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00]);
    body.extend_from_slice(&u16::try_from(extensions.len()).unwrap_or(0).to_be_bytes());
    body.extend_from_slice(&extensions);
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![22, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(handshake.len()).unwrap_or(0).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every case of the suite, judged as `nodemesh explain` judges it.
    #[test]
    fn the_parity_suite_holds_in_the_policy_logic() {
        let mut failures = Vec::new();
        let mut count = 0;
        for group in groups() {
            let mesh = group.mesh();
            for case in &group.cases {
                count += 1;
                let explanation = case.explain(&mesh);
                let got = Case::verdict(&explanation);
                if got != case.expect {
                    failures.push(format!(
                        "{}: {}: expected {:?}, got {got:?}: {:?}",
                        group.group,
                        case.describe(),
                        case.expect,
                        explanation.step
                    ));
                }
            }
        }
        assert!(count > 100, "the suite holds {count} cases");
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn header_escapes() {
        assert_eq!(header_bytes("red\\xff"), b"red\xff");
        assert_eq!(header_bytes("a\\x"), b"a\\x");
    }
}
