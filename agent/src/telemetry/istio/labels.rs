//! The label values of Istio's metrics for one connection, and the connections' labels shared
//! by every connection with the same ends.

use std::sync::{Arc, OnceLock};

use hashbrown::{Equivalent, HashMap};

use super::{HttpHandles, TcpHandles};
use crate::state::ConnectionRecord;

/// The label values of one connection, as its reporter sees it.
#[derive(Debug)]
pub struct Labels {
    reporter: &'static str,
    source_workload: String,
    source_namespace: String,
    source_principal: String,
    destination_workload: String,
    destination_namespace: String,
    destination_principal: String,
    destination_service: String,
    security: &'static str,
    /// The request metrics of these labels for [`COMMON_REQUEST`](super::COMMON_REQUEST),
    /// once one was counted.
    pub(super) common_request: OnceLock<HttpHandles>,
    /// The TCP metrics of these labels for connections without response flags.
    pub(super) common_tcp: OnceLock<TcpHandles>,
}

impl Clone for Labels {
    /// The same label values; metrics resolved for them are not carried over, as a clone is
    /// made to change some.
    fn clone(&self) -> Self {
        Self {
            reporter: self.reporter,
            source_workload: self.source_workload.clone(),
            source_namespace: self.source_namespace.clone(),
            source_principal: self.source_principal.clone(),
            destination_workload: self.destination_workload.clone(),
            destination_namespace: self.destination_namespace.clone(),
            destination_principal: self.destination_principal.clone(),
            destination_service: self.destination_service.clone(),
            security: self.security,
            common_request: OnceLock::new(),
            common_tcp: OnceLock::new(),
        }
    }
}

/// A Service's host name as Istio labels it, from its `namespace/name`.
fn service_host(key: &str) -> String {
    match key.split_once('/') {
        Some((ns, name)) => format!("{name}.{ns}.svc.cluster.local"),
        None => "unknown".to_owned(),
    }
}

/// `namespace/name` split into (name, namespace), `unknown` when absent.
fn workload(key: Option<&str>) -> (String, String) {
    match key.and_then(|k| k.split_once('/')) {
        Some((namespace, name)) => (name.to_owned(), namespace.to_owned()),
        None => ("unknown".to_owned(), "unknown".to_owned()),
    }
}

impl Labels {
    /// The labels of a connection from its record. The outbound proxy reports as `source`,
    /// the inbound one as `destination`.
    pub fn of(record: &ConnectionRecord) -> Self {
        let (source_workload, source_namespace) = workload(record.source_workload.as_deref());
        let (destination_workload, destination_namespace) =
            workload(record.destination_workload.as_deref());
        let destination_service = record
            .destination_service
            .as_deref()
            .map_or_else(|| "unknown".to_owned(), service_host);
        let principal = |id: &Option<String>| id.clone().unwrap_or_else(|| "unknown".to_owned());
        Self {
            reporter: if record.direction == "outbound" {
                "source"
            } else {
                "destination"
            },
            source_workload,
            source_namespace,
            source_principal: principal(&record.source_identity),
            destination_workload,
            destination_namespace,
            destination_principal: principal(&record.destination_identity),
            destination_service,
            security: if record.security == "mtls" {
                "mutual_tls"
            } else {
                "none"
            },
            common_request: OnceLock::new(),
            common_tcp: OnceLock::new(),
        }
    }

    /// The labels of an outbound request: these (the client's side) with the destination the
    /// request reached.
    pub fn with_destination(
        &self,
        workload: Option<&str>,
        principal: Option<String>,
        service: Option<&str>,
    ) -> Self {
        let (destination_workload, destination_namespace) = self::workload(workload);
        Self {
            destination_workload,
            destination_namespace,
            security: if principal.is_some() {
                "mutual_tls"
            } else {
                "none"
            },
            destination_principal: principal.unwrap_or_else(|| "unknown".to_owned()),
            destination_service: service.map_or_else(|| "unknown".to_owned(), service_host),
            ..self.clone()
        }
    }

    pub fn destination_service(&self) -> &str {
        &self.destination_service
    }

    pub fn source_workload(&self) -> &str {
        &self.source_workload
    }

    pub fn source_principal(&self) -> &str {
        &self.source_principal
    }

    pub fn destination_workload(&self) -> &str {
        &self.destination_workload
    }

    pub fn destination_principal(&self) -> &str {
        &self.destination_principal
    }

    pub(super) fn tcp<'a>(&'a self, flags: &'a str) -> [&'a str; 11] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.destination_service,
            "tcp",
            flags,
            self.security,
        ]
    }

    pub(super) fn http<'a>(
        &'a self,
        protocol: &'a str,
        code: &'a str,
        flags: &'a str,
    ) -> [&'a str; 12] {
        [
            self.reporter,
            &self.source_workload,
            &self.source_namespace,
            &self.source_principal,
            &self.destination_workload,
            &self.destination_namespace,
            &self.destination_principal,
            &self.destination_service,
            protocol,
            code,
            flags,
            self.security,
        ]
    }
}

/// Connections' labels by what they are made of. Bounded: emptied when full, the labels then
/// made again on the next connections (the metrics they resolved stay registered).
#[derive(Debug, Default)]
pub(super) struct LabelCache(HashMap<Ends, Arc<Labels>>);

/// Label sets kept: pairs of ends a node's connections have had lately.
const CACHED: usize = 4096;

impl LabelCache {
    /// The labels of the connection `record` describes, from an earlier connection with the
    /// same ends when there was one. A lookup builds no string.
    pub(super) fn get_or_insert(&mut self, record: &ConnectionRecord) -> Arc<Labels> {
        let ends = EndsOf::of(record);
        if let Some(labels) = self.0.get(&ends) {
            return labels.clone();
        }
        if self.0.len() >= CACHED {
            self.0.clear();
        }
        let labels = Arc::new(Labels::of(record));
        self.0.insert(ends.to_owned(), labels.clone());
        labels
    }
}

/// What [`Labels::of`] reads from a connection's record.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Ends {
    direction: &'static str,
    source_workload: Option<String>,
    destination_workload: Option<String>,
    destination_service: Option<String>,
    source_identity: Option<String>,
    destination_identity: Option<String>,
    security: &'static str,
}

/// [`Ends`] borrowed from a record. Its fields are those of `Ends` in the same order, each
/// hashing as its owned counterpart does, so it finds the entry `to_owned` made.
#[derive(Hash)]
struct EndsOf<'a> {
    direction: &'static str,
    source_workload: Option<&'a str>,
    destination_workload: Option<&'a str>,
    destination_service: Option<&'a str>,
    source_identity: Option<&'a str>,
    destination_identity: Option<&'a str>,
    security: &'static str,
}

impl<'a> EndsOf<'a> {
    fn of(record: &'a ConnectionRecord) -> Self {
        Self {
            direction: record.direction,
            source_workload: record.source_workload.as_deref(),
            destination_workload: record.destination_workload.as_deref(),
            destination_service: record.destination_service.as_deref(),
            source_identity: record.source_identity.as_deref(),
            destination_identity: record.destination_identity.as_deref(),
            security: record.security,
        }
    }

    fn to_owned(&self) -> Ends {
        let owned = |value: Option<&str>| value.map(str::to_owned);
        Ends {
            direction: self.direction,
            source_workload: owned(self.source_workload),
            destination_workload: owned(self.destination_workload),
            destination_service: owned(self.destination_service),
            source_identity: owned(self.source_identity),
            destination_identity: owned(self.destination_identity),
            security: self.security,
        }
    }
}

impl Equivalent<Ends> for EndsOf<'_> {
    fn equivalent(&self, key: &Ends) -> bool {
        self.direction == key.direction
            && self.source_workload == key.source_workload.as_deref()
            && self.destination_workload == key.destination_workload.as_deref()
            && self.destination_service == key.destination_service.as_deref()
            && self.source_identity == key.source_identity.as_deref()
            && self.destination_identity == key.destination_identity.as_deref()
            && self.security == key.security
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound() -> ConnectionRecord {
        ConnectionRecord {
            direction: "inbound",
            workload: "shop/web".into(),
            destination_workload: Some("shop/web".into()),
            destination_identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            source_identity: Some("spiffe://cluster.local/ns/shop/sa/client".into()),
            security: "mtls",
            ..ConnectionRecord::example()
        }
    }

    #[test]
    fn connections_with_the_same_ends_share_their_labels_and_any_other_end_gets_its_own() {
        let mut cache = LabelCache::default();
        let first = cache.get_or_insert(&inbound());
        // Another connection between the same workloads: another client port, id, byte counts.
        let again = cache.get_or_insert(&ConnectionRecord {
            id: 2,
            client: "10.0.0.9:50000".parse().expect("addr"),
            bytes_from_client: 10,
            ..inbound()
        });
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.source_workload(), "client");
        assert_eq!(first.destination_workload(), "web");

        let others = [
            ConnectionRecord {
                direction: "outbound",
                ..inbound()
            },
            ConnectionRecord {
                source_workload: Some("shop/other".into()),
                ..inbound()
            },
            ConnectionRecord {
                source_workload: None,
                ..inbound()
            },
            ConnectionRecord {
                destination_workload: Some("shop/db".into()),
                ..inbound()
            },
            ConnectionRecord {
                destination_service: Some("shop/web".into()),
                ..inbound()
            },
            ConnectionRecord {
                source_identity: None,
                ..inbound()
            },
            ConnectionRecord {
                destination_identity: Some("spiffe://cluster.local/ns/shop/sa/db".into()),
                ..inbound()
            },
            ConnectionRecord {
                security: "plaintext",
                ..inbound()
            },
        ];
        for record in &others {
            let labels = cache.get_or_insert(record);
            assert!(!Arc::ptr_eq(&first, &labels), "{record:?}");
            assert!(Arc::ptr_eq(&labels, &cache.get_or_insert(record)));
        }
        assert_eq!(cache.0.len(), 1 + others.len());
    }

    #[test]
    fn a_full_cache_starts_over() {
        let mut cache = LabelCache::default();
        let first = cache.get_or_insert(&inbound());
        for n in 0..CACHED {
            cache.get_or_insert(&ConnectionRecord {
                source_workload: Some(format!("shop/client-{n}")),
                ..inbound()
            });
        }
        assert!(cache.0.len() <= CACHED);
        assert!(!Arc::ptr_eq(&first, &cache.get_or_insert(&inbound())));
    }
}
