//! The sandbox's mesh configuration: the directory the agents watch. One file per workload,
//! so that removing a pod from the mesh is removing a file.

use std::fs;

use anyhow::Context as _;

use crate::layout::{LEGACY_NAMESPACE, Layout, MESH_NAMESPACE, PodPlan, netns_path};

pub fn write(layout: &Layout) -> anyhow::Result<()> {
    let dir = layout.config_dir();
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let namespaces = format!(
        "# Namespaces of the sandbox. Workloads in a namespace labelled\n\
         # nodemesh.dev/enabled: \"true\" are in the mesh.\n\
         apiVersion: v1\n\
         kind: Namespace\n\
         metadata:\n  name: {MESH_NAMESPACE}\n  labels:\n    nodemesh.dev/enabled: \"true\"\n\
         ---\n\
         apiVersion: v1\n\
         kind: Namespace\n\
         metadata:\n  name: {LEGACY_NAMESPACE}\n"
    );
    write_file(layout, "00-namespaces.yaml", &namespaces)?;
    for pod in layout.all_pods() {
        write_file(
            layout,
            &format!("workload-{}.yaml", pod.name),
            &workload_yaml(&pod),
        )?;
    }
    Ok(())
}

fn write_file(layout: &Layout, name: &str, text: &str) -> anyhow::Result<()> {
    let path = layout.config_dir().join(name);
    fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// A label value as YAML: bare when it reads back as the same string, quoted otherwise
/// (`"true"`, `"10"`, anything with punctuation YAML gives a meaning).
fn scalar(value: &str) -> String {
    let plain = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._/".contains(&b))
        && value
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic())
        && !matches!(
            value.to_ascii_lowercase().as_str(),
            "true" | "false" | "yes" | "no" | "on" | "off" | "null" | "y" | "n"
        );
    if plain {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

pub fn workload_yaml(pod: &PodPlan) -> String {
    let labels: String = pod
        .labels
        .iter()
        .map(|(key, value)| format!("    {key}: {}\n", scalar(value)))
        .collect();
    format!(
        "apiVersion: nodemesh.dev/v1alpha1\n\
         kind: Workload\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n{labels}\
         spec:\n  node: {node}\n  netns: {netns}\n  ip: {ip}\n  serviceAccount: {sa}\n",
        name = pod.name,
        namespace = pod.namespace,
        node = pod.node,
        netns = netns_path(&pod.netns).display(),
        ip = pod.ip,
        sa = pod.service_account,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_read_back_as_the_strings_they_are() {
        for (value, written) in [
            ("n1-p1", "n1-p1"),
            ("v1", "v1"),
            ("true", "\"true\""),
            ("10", "\"10\""),
            ("a b", "\"a b\""),
            ("", "\"\""),
        ] {
            assert_eq!(scalar(value), written, "{value:?}");
            let read: std::collections::BTreeMap<String, String> =
                serde_yaml::from_str(&format!("k: {written}")).expect("yaml");
            assert_eq!(read["k"], value, "{written} reads back");
        }
    }
}
