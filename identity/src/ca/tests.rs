use std::{os::unix::fs::PermissionsExt as _, sync::Arc, time::Duration};

use rustls::{ClientConnection, ServerConnection};

use super::*;
use crate::{CertificateRequest, WorkloadCertificate, tls};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "shop", sa).expect("valid id")
}

fn issue(ca: &CertificateAuthority, id: SpiffeId, ttl: Duration) -> WorkloadCertificate {
    let request = CertificateRequest::new(id.clone()).expect("csr");
    let issued = ca
        .sign_workload(request.csr_pem(), &id, ttl)
        .expect("signed");
    request.complete(&issued.chain_pem).expect("complete")
}

fn new_ca() -> (tempfile::TempDir, CertificateAuthority) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("new CA");
    (dir, ca)
}

/// Runs a TLS handshake in memory; returns the client identity the server saw.
fn handshake(
    client: rustls::ClientConfig,
    server: rustls::ServerConfig,
) -> Result<Option<SpiffeId>, rustls::Error> {
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(10, 0, 0, 1).into());
    let mut client = ClientConnection::new(Arc::new(client), name)?;
    let mut server = ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).expect("client writes");
        server.read_tls(&mut buf.as_slice()).expect("server reads");
        server.process_new_packets()?;
        let mut buf = Vec::new();
        server.write_tls(&mut buf).expect("server writes");
        client.read_tls(&mut buf.as_slice()).expect("client reads");
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            // TLS 1.3: the server judges the client's certificate after the client finished;
            // one more flight lets a refusal reach the client.
            let mut buf = Vec::new();
            client.write_tls(&mut buf).expect("client writes");
            server.read_tls(&mut buf.as_slice()).expect("server reads");
            server.process_new_packets()?;
            return Ok(tls::peer_identity(server.peer_certificates()));
        }
    }
    panic!("handshake did not finish");
}

#[test]
fn a_new_root_is_created_once_with_a_private_key_file() {
    let (dir, ca) = new_ca();
    let mode = fs::metadata(dir.path().join(CA_KEY))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("reload");
    assert_eq!(
        ca.bundle(),
        again.bundle(),
        "the same root is loaded, not a new one"
    );
    assert_eq!(ca.bundle().roots().len(), 1);
}

#[test]
fn signs_a_workload_certificate_for_exactly_the_requested_identity() {
    let (_dir, ca) = new_ca();
    let cert = issue(&ca, id("web"), DAY);
    assert_eq!(cert.id(), &id("web"));
    assert_eq!(cert.chain().len(), 1, "a root CA sends only the leaf");
    let life = cert
        .not_after()
        .duration_since(cert.not_before())
        .expect("ordered");
    assert!(
        life >= DAY && life <= DAY + Duration::from_secs(120),
        "{life:?}"
    );
    let renew = cert
        .renew_at(0.5)
        .duration_since(cert.not_before())
        .expect("after start");
    assert!(renew > life / 3 && renew < life * 2 / 3);

    let request = CertificateRequest::new(id("web")).expect("csr");
    let refused = ca.sign_workload(request.csr_pem(), &id("api"), DAY);
    assert!(
        matches!(refused, Err(CaError::WrongIdentity { .. })),
        "{refused:?}"
    );
}

#[test]
fn only_ecdsa_p256_keys_are_signed() {
    let (_dir, ca) = new_ca();
    let uri: rcgen::string::Ia5String = id("web").to_string().try_into().expect("SAN");
    for algorithm in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(algorithm).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.clone())];
        let csr = params.serialize_request(&key).expect("CSR");
        let refused = ca.sign_workload(&csr.pem().expect("PEM"), &id("web"), DAY);
        assert!(matches!(refused, Err(CaError::KeyType)), "{refused:?}");
    }
}

#[test]
fn mutual_tls_checks_both_identities() {
    let (_dir, ca) = new_ca();
    let (client, server) = (issue(&ca, id("web"), DAY), issue(&ca, id("api"), DAY));
    let bundle = ca.bundle();
    let server_config = || tls::server_config(&server, bundle).expect("server config");

    let seen = handshake(
        tls::client_config(&client, bundle, id("api")).expect("client config"),
        server_config(),
    )
    .expect("handshake");
    assert_eq!(
        seen,
        Some(id("web")),
        "the server learns the client's identity"
    );

    let wrong = handshake(
        tls::client_config(&client, bundle, id("db")).expect("client config"),
        server_config(),
    );
    let message = wrong
        .expect_err("a server that is not the expected identity")
        .to_string();
    assert!(
        message.contains("spiffe://cluster.local/ns/shop/sa/api"),
        "{message}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused_both_ways() {
    let (_a, ca) = new_ca();
    let (_b, other) = new_ca();
    let server = issue(&ca, id("api"), DAY);
    let stranger = issue(&other, id("web"), DAY);
    let refused = handshake(
        tls::client_config(&stranger, other.bundle(), id("api")).expect("client config"),
        tls::server_config(&server, ca.bundle()).expect("server config"),
    );
    assert!(
        refused.is_err(),
        "a client of another CA must not get through"
    );

    let client = issue(&ca, id("web"), DAY);
    let impostor = issue(&other, id("api"), DAY);
    let refused = handshake(
        tls::client_config(&client, ca.bundle(), id("api")).expect("client config"),
        tls::server_config(&impostor, other.bundle()).expect("server config"),
    );
    assert!(
        refused.is_err(),
        "a server of another CA must not be believed"
    );
}

#[test]
fn an_expired_certificate_is_refused() {
    let (_dir, ca) = new_ca();
    let expired = issue(&ca, id("web"), Duration::ZERO);
    std::thread::sleep(Duration::from_millis(1100));
    assert!(!expired.is_valid_at(SystemTime::now()));
    let server = issue(&ca, id("api"), DAY);
    let refused = handshake(
        tls::client_config(&expired, ca.bundle(), id("api")).expect("client config"),
        tls::server_config(&server, ca.bundle()).expect("server config"),
    );
    let message = refused.expect_err("expired client certificate").to_string();
    assert!(message.to_lowercase().contains("expired"), "{message}");
}

#[test]
fn an_operator_intermediate_chains_to_the_operator_root() {
    let (root_dir, root) = new_ca();
    // The operator's intermediate, signed by their root.
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, "company intermediate");
    let intermediate = params.signed_by(&key, &root.issuer).expect("intermediate");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key_file) = (dir.path().join("int.pem"), dir.path().join("int-key.pem"));
    fs::write(&cert, intermediate.pem()).expect("write");
    fs::write(&key_file, key.serialize_pem()).expect("write");

    let missing = CertificateAuthority::from_files(&cert, &key_file, None);
    assert!(
        matches!(missing, Err(CaError::IntermediateWithoutBundle { .. })),
        "{missing:?}"
    );

    let bundle = root_dir.path().join(CA_CERT);
    let ca =
        CertificateAuthority::from_files(&cert, &key_file, Some(&bundle)).expect("intermediate CA");
    let (client, server) = (issue(&ca, id("web"), DAY), issue(&ca, id("api"), DAY));
    assert_eq!(client.chain().len(), 2, "leaf and intermediate");
    let seen = handshake(
        tls::client_config(&client, ca.bundle(), id("api")).expect("client config"),
        tls::server_config(&server, ca.bundle()).expect("server config"),
    )
    .expect("chains to the operator's root");
    assert_eq!(seen, Some(id("web")));

    let stranger_key = dir.path().join("other-key.pem");
    fs::write(
        &stranger_key,
        KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write");
    let mismatch = CertificateAuthority::from_files(&cert, &stranger_key, Some(&bundle));
    assert!(
        matches!(mismatch, Err(CaError::BadKey { .. })),
        "{mismatch:?}"
    );
}

#[test]
fn the_bundle_can_hold_a_second_root() {
    let (dir, ca) = new_ca();
    let (_next_dir, next) = new_ca();
    let both = ca.bundle().to_pem().concat() + &next.bundle().to_pem().concat();
    fs::write(dir.path().join(EXTRA_ROOTS), both).expect("write bundle");
    let rotating =
        CertificateAuthority::load_or_create(dir.path(), "cluster.local").expect("reload");
    assert_eq!(rotating.bundle().roots().len(), 2);
    // A peer already issued by the next root is accepted during the rotation.
    let client = issue(&next, id("web"), DAY);
    let server = issue(&rotating, id("api"), DAY);
    handshake(
        tls::client_config(&client, rotating.bundle(), id("api")).expect("client config"),
        tls::server_config(&server, rotating.bundle()).expect("server config"),
    )
    .expect("both roots trusted");
}

#[test]
fn a_certificate_survives_a_round_trip_through_pem() {
    let (_dir, ca) = new_ca();
    let cert = issue(&ca, id("web"), DAY);
    let (chain, key) = cert.to_pem();
    let back = WorkloadCertificate::from_pem(id("web"), &chain, &key).expect("reloaded");
    assert_eq!(back.serial(), cert.serial());
    assert_eq!(back.not_after(), cert.not_after());
    assert!(
        WorkloadCertificate::from_pem(id("api"), &chain, &key).is_err(),
        "the identity is checked"
    );
    let other = issue(&ca, id("web"), DAY).to_pem().1;
    assert!(
        matches!(
            WorkloadCertificate::from_pem(id("web"), &chain, &other),
            Err(crate::CertificateError::KeyMismatch)
        ),
        "the key is checked"
    );
}
