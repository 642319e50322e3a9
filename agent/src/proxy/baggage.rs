//! The headers Istio's ztunnel puts on HBONE CONNECT requests, so that in a mesh mixing both,
//! each side's telemetry names the other's workloads: W3C `baggage` with the source workload,
//! `forwarded` with the client's address (and the Service's host), and an unsampled
//! `traceparent`.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, header};

/// The `baggage` of the workload `namespace/name`, made once when it is enrolled.
pub fn baggage(workload: &str) -> Option<HeaderValue> {
    let (namespace, name) = workload.split_once('/').unwrap_or(("default", workload));
    HeaderValue::from_str(&format!(
        "k8s.cluster.name=Kubernetes,k8s.namespace.name={namespace},k8s.pod.name={name},\
         service.name={name},service.version=latest"
    ))
    .ok()
}

/// The CONNECT headers for a connection from a workload with `baggage` at `client`,
/// addressed to `service` (`namespace/name`) when it went to a Service.
pub fn connect_headers(
    baggage: Option<&HeaderValue>,
    client: SocketAddr,
    service: Option<&str>,
) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(3);
    if let Some(baggage) = baggage {
        headers.insert("baggage", baggage.clone());
    }
    let forwarded = match service.and_then(|s| s.split_once('/')) {
        Some((ns, svc)) => format!("for=\"{client}\";host={svc}.{ns}.svc.cluster.local"),
        None => format!("for=\"{client}\""),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert(header::FORWARDED, value);
    }
    let traceparent = format!(
        "00-{:032x}-{:016x}-00",
        fastrand::u128(1..),
        fastrand::u64(1..)
    );
    if let Ok(value) = HeaderValue::from_str(&traceparent) {
        headers.insert("traceparent", value);
    }
    headers
}

/// The source workload (`namespace/name`) a CONNECT's `baggage` names, as ztunnel reads it:
/// every `baggage` value split on `,` then `=`, later keys winning.
pub fn source_workload(headers: &HeaderMap) -> Option<String> {
    let mut namespace = None;
    let mut name = None;
    for value in headers.get_all("baggage") {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let Some((key, value)) = item.trim().split_once('=') else {
                continue;
            };
            let value = value.split(';').next().unwrap_or("").trim();
            if value.is_empty() {
                continue;
            }
            match key {
                "k8s.namespace.name" => namespace = Some(value),
                "k8s.deployment.name"
                | "k8s.cronjob.name"
                | "k8s.pod.name"
                | "k8s.job.name"
                | "k8s.daemonset.name"
                | "k8s.statefulset.name"
                | "k8s.replicaset.name" => {
                    name = Some(value);
                }
                _ => {}
            }
        }
    }
    Some(format!("{}/{}", namespace?, name?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_headers_are_ztunnels() {
        let client: SocketAddr = "10.88.1.2:43210".parse().expect("addr");
        let baggage = baggage("shop/web-1");
        let headers = connect_headers(baggage.as_ref(), client, Some("shop/web"));
        assert_eq!(
            headers["baggage"],
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-1,service.name=web-1,service.version=latest"
        );
        assert_eq!(
            headers[header::FORWARDED],
            "for=\"10.88.1.2:43210\";host=web.shop.svc.cluster.local"
        );
        let traceparent = headers["traceparent"].to_str().expect("text");
        assert_eq!(traceparent.len(), 55);
        assert!(
            traceparent.starts_with("00-") && traceparent.ends_with("-00"),
            "{traceparent}"
        );
        let direct = connect_headers(baggage.as_ref(), client, None);
        assert_eq!(direct[header::FORWARDED], "for=\"10.88.1.2:43210\"");
    }

    #[test]
    fn baggage_from_ztunnel_names_the_source() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "baggage",
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
                .parse()
                .expect("value"),
        );
        assert_eq!(source_workload(&headers).as_deref(), Some("default/sleep"));
        let ours = connect_headers(
            baggage("shop/web-1").as_ref(),
            "10.0.0.1:1".parse().expect("addr"),
            None,
        );
        assert_eq!(
            source_workload(&ours).as_deref(),
            Some("shop/web-1"),
            "round trip"
        );
        let mut partial = HeaderMap::new();
        partial.insert(
            "baggage",
            "k8s.namespace.name=,k8s.pod.name=x".parse().expect("value"),
        );
        assert_eq!(
            source_workload(&partial),
            None,
            "an empty value names nothing"
        );
    }
}
