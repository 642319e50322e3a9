//! Where `explain` reads the mesh from: a directory, or the running controller's
//! `/config_dump`.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use nodemesh_config::{DEFAULT_TRUST_DOMAIN, MeshConfig, load_path};

/// The configuration and the trust domain it is read with.
pub struct Loaded {
    pub mesh: MeshConfig,
    pub trust_domain: String,
}

pub fn from_dir(path: &Path, trust_domain: Option<&str>) -> anyhow::Result<Loaded> {
    let mesh = load_path(path).map_err(|errors| {
        anyhow::anyhow!(
            "{} is not valid (run `nodemesh check`):\n{errors}",
            path.display()
        )
    })?;
    Ok(Loaded {
        mesh,
        trust_domain: trust_domain.unwrap_or(DEFAULT_TRUST_DOMAIN).to_owned(),
    })
}

/// GETs `path` from `url` (`http://host:port`) and returns the answer: (status, body).
pub fn http_get(url: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let authority = url
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .with_context(|| format!("{url:?} must look like http://host:port"))?;
    let mut stream =
        TcpStream::connect(authority).with_context(|| format!("cannot reach {authority}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{authority} answered without a body"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{authority} answered {:?}", head.lines().next()))?;
    Ok((status, body.to_owned()))
}

/// GETs a JSON document; anything but 200 is an error carrying the answer.
pub fn get_json(url: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(url, path)?;
    if status != 200 {
        bail!("{url}{path} answered {status}: {}", body.trim());
    }
    serde_json::from_str(&body).with_context(|| format!("{url}{path} is not JSON"))
}

/// `url` is the controller's monitoring endpoint, `http://host:15014`.
pub fn from_controller(url: &str, trust_domain: Option<&str>) -> anyhow::Result<Loaded> {
    let dump = get_json(url, "/config_dump")?;
    if dump["config"].is_null() {
        bail!("the controller has no valid configuration in force");
    }
    let mesh: MeshConfig = serde_json::from_value(dump["config"].clone())
        .context("the controller's configuration could not be read")?;
    let trust_domain = trust_domain
        .or_else(|| dump["controller"]["trust_domain"].as_str())
        .unwrap_or(DEFAULT_TRUST_DOMAIN)
        .to_owned();
    Ok(Loaded { mesh, trust_domain })
}
