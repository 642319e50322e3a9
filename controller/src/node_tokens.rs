//! Bootstrap tokens: how an agent proves which node it runs on (local mode). The file is a
//! YAML map of node name to token; each agent holds its own node's token.

use std::{collections::BTreeMap, path::Path};

/// Tokens shorter than this are refused: they could be guessed.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct NodeTokens {
    by_node: BTreeMap<String, String>,
}

impl NodeTokens {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read node tokens {}: {e}", path.display()))?;
        let by_node: BTreeMap<String, String> = serde_yaml::from_str(&text).map_err(|e| {
            format!(
                "{}: not a YAML map of node name to token: {e}",
                path.display()
            )
        })?;
        if let Some((node, _)) = by_node.iter().find(|(_, t)| t.len() < MIN_TOKEN_LEN) {
            return Err(format!(
                "{}: the token of node {node} is shorter than {MIN_TOKEN_LEN} characters",
                path.display()
            ));
        }
        Ok(Self { by_node })
    }

    pub fn len(&self) -> usize {
        self.by_node.len()
    }

    /// The node an `Authorization: Bearer <token>` header belongs to. Every token is compared
    /// in full, so timing does not tell which one came close.
    pub fn node_of(&self, authorization: Option<&str>) -> Option<&str> {
        let presented = authorization?.strip_prefix("Bearer ")?.trim();
        let mut found = None;
        for (node, token) in &self.by_node {
            if constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                found = Some(node.as_str());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_identify_their_node_only() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tokens.yaml");
        std::fs::write(
            &path,
            "n1: aaaaaaaaaaaaaaaaaaaa\nn2: bbbbbbbbbbbbbbbbbbbb\n",
        )
        .expect("write");
        let tokens = NodeTokens::load(&path).expect("valid");
        assert_eq!(
            tokens.node_of(Some("Bearer aaaaaaaaaaaaaaaaaaaa")),
            Some("n1")
        );
        assert_eq!(
            tokens.node_of(Some("Bearer bbbbbbbbbbbbbbbbbbbb")),
            Some("n2")
        );
        assert_eq!(tokens.node_of(Some("Bearer aaaaaaaaaaaaaaaaaaab")), None);
        assert_eq!(tokens.node_of(Some("aaaaaaaaaaaaaaaaaaaa")), None);
        assert_eq!(tokens.node_of(None), None);

        std::fs::write(&path, "n1: short\n").expect("write");
        assert!(
            NodeTokens::load(&path)
                .expect_err("short token")
                .contains("n1")
        );
    }
}
