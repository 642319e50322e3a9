//! Service addresses: a connection to a Service's virtual IP is captured and carried to one of
//! the workloads its selector picks (least connections open, ties at random), with mTLS when
//! that workload is in the mesh.

use std::{collections::BTreeSet, fs, time::Duration};

use nodemesh_sandbox::poll_until;
use nodemesh_tests::{curl, sandbox};

const SOON: Duration = Duration::from_secs(10);

#[test]
fn a_service_address_reaches_every_selected_workload() {
    let Some(sb) = sandbox("tsvc") else { return };
    // Label two pods on different nodes as the web tier.
    for pod in ["n1-p2", "n2-p2"] {
        let file = sb.config_dir().join(format!("workload-{pod}.yaml"));
        let text = fs::read_to_string(&file).expect("workload file");
        fs::write(
            &file,
            text.replace(
                &format!("app: {pod}\n"),
                &format!("app: {pod}\n    tier: web\n"),
            ),
        )
        .expect("relabel");
    }
    let service = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    tier: web\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n";
    fs::write(sb.config_dir().join("service-web.yaml"), service).expect("write the Service");

    let pods = poll_until(SOON, || {
        let mut pods = BTreeSet::new();
        for _ in 0..6 {
            let (status, body) = curl(&sb.pod("n1-p1").netns, "http://10.96.0.10/", &[])?;
            anyhow::ensure!(status == 200, "HTTP {status}: {body}");
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            pods.insert(answer["pod"].as_str().unwrap_or_default().to_owned());
        }
        anyhow::ensure!(pods.len() == 2, "only {pods:?} answered");
        Ok(pods)
    })
    .expect("the Service address answers from both selected workloads");
    assert_eq!(pods.into_iter().collect::<Vec<_>>(), ["n1-p2", "n2-p2"]);

    let record = nodemesh_tests::connections(&sb, "n1")
        .into_iter()
        .rev()
        .find(|c| c["original_dst"] == "10.96.0.10:80")
        .expect("a record");
    assert_eq!(record["destination_service"], "default/web");
    assert_eq!(record["security"], "mtls", "{record}");

    let (status, _) =
        curl(&sb.pod("n1-p1").netns, "http://10.96.0.10:81/", &[]).unwrap_or((0, String::new()));
    assert_eq!(status, 0, "a port the Service does not expose is refused");
}
