use std::{fmt, path::PathBuf};

/// One thing wrong with the configuration: where it is and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file the object came from; empty for an object read from the Kubernetes API.
    pub file: PathBuf,
    /// `Kind namespace/name` of the object, when it could be read that far.
    pub object: Option<String>,
    /// Dotted path of the offending field, such as `spec.ip`.
    pub field: Option<String>,
    /// What is wrong and what is allowed instead.
    pub message: String,
}

impl ConfigError {
    pub(crate) fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            object: None,
            field: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Objects read from the Kubernetes API have no file.
        let mut parts = Vec::new();
        if !self.file.as_os_str().is_empty() {
            parts.push(self.file.display().to_string());
        }
        if let Some(object) = &self.object {
            parts.push(object.clone());
        }
        if let Some(field) = &self.field {
            parts.push(format!("field `{field}`"));
        }
        parts.push(self.message.clone());
        write!(f, "{}", parts.join(": "))
    }
}

/// Every error found in one load: the whole input is refused when this is not empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
