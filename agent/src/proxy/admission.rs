//! Caps on open connections: per node (every pod's listeners together) and per source
//! address, so that one client, or a flood, cannot take every descriptor and task the proxy
//! has. A connection over a cap is closed at once and counted.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// The caps, and what is open now.
#[derive(Debug)]
pub struct Admission {
    node_max: usize,
    per_source_max: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted; the `reason` label of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeLimit,
    SourceLimit,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeLimit => "node_limit",
            Self::SourceLimit => "source_limit",
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Admission {
    pub fn new(node_max: usize, per_source_max: usize) -> Arc<Self> {
        Arc::new(Self {
            node_max,
            per_source_max,
            open: Mutex::default(),
        })
    }

    /// Admits a connection from `source`, or says which cap it is over.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Admitted, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.node_max {
            return Err(Refusal::NodeLimit);
        }
        let from_source = open.by_source.entry(source).or_default();
        if *from_source >= self.per_source_max {
            return Err(Refusal::SourceLimit);
        }
        *from_source += 1;
        open.total += 1;
        Ok(Admitted {
            admission: self.clone(),
            source,
        })
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self
            .admission
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        open.total -= 1;
        if let Some(count) = open.by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                open.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn one_source_is_capped_before_the_node() {
        let admission = Admission::new(4, 2);
        let a1 = admission.admit(ip(1)).expect("first");
        let _a2 = admission.admit(ip(1)).expect("second");
        assert_eq!(
            admission.admit(ip(1)).expect_err("over"),
            Refusal::SourceLimit
        );
        let _b1 = admission
            .admit(ip(2))
            .expect("another source is not affected");
        drop(a1);
        let _a3 = admission
            .admit(ip(1))
            .expect("a closed connection frees its place");
        assert_eq!(admission.open(), 3);
    }

    #[test]
    fn the_node_cap_holds_across_sources() {
        let admission = Admission::new(2, 10);
        let held: Vec<Admitted> = [1, 2]
            .into_iter()
            .map(|i| admission.admit(ip(i)).expect("under the cap"))
            .collect();
        assert_eq!(
            admission.admit(ip(3)).expect_err("over"),
            Refusal::NodeLimit
        );
        drop(held);
        assert_eq!(admission.open(), 0);
        assert!(
            admission.open.lock().expect("lock").by_source.is_empty(),
            "no entry is kept for a source with nothing open"
        );
        admission.admit(ip(3)).expect("room again");
    }
}
