//! Local mode: the mesh configuration comes from a file or directory, reloaded when it changes.

use std::{path::PathBuf, time::Duration};

use crate::{ConfigErrors, MeshConfig, SourceFingerprint, load_path};

/// Watches a configuration file or directory by polling: cheap (a `stat` per file) and
/// indifferent to how editors and tools replace files.

#[derive(Debug)]
pub struct LocalSource {
    path: PathBuf,
    interval: Duration,
    seen: Option<SourceFingerprint>,
}

impl LocalSource {
    pub fn new(path: PathBuf, interval: Duration) -> Self {
        Self {
            path,
            interval,
            seen: None,
        }
    }

    /// Waits until the files differ from the last load (at once, the first time), then loads
    /// them.
    pub async fn changed(&mut self) -> Result<MeshConfig, ConfigErrors> {
        loop {
            let now = SourceFingerprint::of(&self.path);
            if self.seen.as_ref() != Some(&now) {
                self.seen = Some(now);
                return load_path(&self.path);
            }
            tokio::time::sleep(self.interval).await;
        }
    }
}
