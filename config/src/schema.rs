//! The OpenAPI schemas of the types whose YAML form serde's derive does not describe: what
//! the CRDs generated from the configuration's types say of them.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};

use crate::{GatewayDuration, GoDuration, PortKey, meta::Ignored};

/// Gateway API's duration format (GEP-2257), as its own CRDs write it.
const GATEWAY_DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";
/// Go's `time.ParseDuration`, as Kubernetes' `metav1.Duration` takes it.
const GO_DURATION_PATTERN: &str =
    "^[-+]?(([0-9]+(\\.[0-9]*)?|\\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+$|^[-+]?0$";

impl JsonSchema for Ignored {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Ignored".into()
    }

    /// Anything: the controller reads such a field only to refuse it by name.
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
    }
}

impl JsonSchema for GatewayDuration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "GatewayDuration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": GATEWAY_DURATION_PATTERN })
    }
}

impl JsonSchema for GoDuration {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "pattern": GO_DURATION_PATTERN })
    }
}

impl JsonSchema for PortKey {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "PortKey".into()
    }

    /// A map key: in JSON always a string (of digits, which the controller checks: a
    /// pattern on keys would be `patternProperties`, which Kubernetes' schemas forbid).
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_patterns_take_what_the_parsers_take() {
        let gateway = regex::Regex::new(GATEWAY_DURATION_PATTERN).expect("regex");
        for ok in ["500ms", "10s", "1h30m", "0s"] {
            assert!(gateway.is_match(ok), "{ok}");
            assert!(GatewayDuration::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["10", "1.5s", "123456s", "1d"] {
            assert!(!gateway.is_match(bad), "{bad}");
            assert!(GatewayDuration::parse(bad).is_err(), "{bad}");
        }
        let go = regex::Regex::new(GO_DURATION_PATTERN).expect("regex");
        for ok in ["30s", "1.5h", "300ms", "0", "2h45m"] {
            assert!(go.is_match(ok), "{ok}");
        }
        for bad in ["30", "1d", "s"] {
            assert!(!go.is_match(bad), "{bad}");
        }
    }
}
