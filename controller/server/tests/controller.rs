//! The controller end to end over real TLS: membership, watch, loss, restart, auth refusals,
//! malformed input, health, reflection, shutdown.

mod common;

use std::time::{Duration, Instant};

use common::*;
use geomx_proto::pki::CertificateAuthority;
use geomx_proto::tls::TlsMaterial;
use geomx_proto::v1::agent_service_client::AgentServiceClient;
use geomx_proto::v1::host_service_client::HostServiceClient;
use geomx_proto::v1::{
    ContainerState, HostReport, LeaveRequest, ListHostsRequest, ListJobsRequest, NetworkStatus,
    NodeStatus, RegisterRequest, WatchRequest,
};
use tonic::Code;

#[tokio::test]
async fn register_grants_distinct_stable_leases() {
    let lab = Lab::start().await;
    let mut a = lab.agent("a").await;
    let mut b = lab.agent("b").await;
    let ra = register(&mut a, "a").await;
    let rb = register(&mut b, "b").await;
    assert_ne!(ra.subnet, rb.subnet);
    assert_eq!(ra.cluster_cidr, "172.17.0.0/16");
    assert_eq!(ra.heartbeat_interval_ms, 200);
    assert_eq!(ra.grace_period_ms, 1000);
    assert_eq!(ra.controller_id, lab.controller().controller_id());
    assert!(ra.subnet.starts_with("172.17.") && ra.subnet.ends_with("/24"));
    // Registering again (an agent restart) gives the same subnet.
    assert_eq!(register(&mut a, "a").await.subnet, ra.subnet);

    let hosts = lab.list_hosts().await;
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].name, "a");
    assert_eq!(hosts[0].state, "ready");
    assert_eq!(hosts[0].underlay_ip, "10.1.1.1");
    assert_eq!(hosts[0].subnet, ra.subnet);
    assert_eq!(hosts[0].agent_version, "test-agent 0.1");
    assert_eq!(hosts[0].agent_url, "https://10.1.1.1:7947");
    assert!(hosts[0].registered_at_ms > 0);
}

#[tokio::test]
async fn peers_see_each_other_within_a_second() {
    let lab = Lab::start().await;
    let mut a = lab.agent("a").await;
    let mut b = lab.agent("b").await;
    let ra = register(&mut a, "a").await;
    let mut watch_a = a
        .watch(WatchRequest { host: "a".into() })
        .await
        .expect("watch")
        .into_inner();
    let first = next_state(&mut watch_a, Duration::from_secs(1)).await;
    assert_eq!(first.host, "a");
    assert_eq!(first.subnet, ra.subnet);
    assert_eq!(first.cluster_cidr, "172.17.0.0/16");
    assert!(first.peers.is_empty());
    assert!(first.containers.is_empty());
    assert_eq!(first.heartbeat_interval_ms, 200);
    assert_eq!(first.controller_id, ra.controller_id);

    let started = Instant::now();
    let rb = register(&mut b, "b").await;
    let next = next_state(&mut watch_a, Duration::from_secs(1)).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(peer_names(&next), ["b"]);
    assert_eq!(next.peers[0].underlay_ip, "10.1.1.2");
    assert_eq!(next.peers[0].subnet, rb.subnet);
    assert!(next.revision > first.revision);

    // b's own stream starts with a as its peer.
    let mut watch_b = b
        .watch(WatchRequest { host: "b".into() })
        .await
        .expect("watch")
        .into_inner();
    let sb = next_state(&mut watch_b, Duration::from_secs(1)).await;
    assert_eq!(peer_names(&sb), ["a"]);
    assert_eq!(sb.peers[0].subnet, ra.subnet);

    // A heartbeat changes nothing anyone routes on: no new state is pushed.
    a.report(report("a")).await.expect("report");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), watch_b.message())
            .await
            .is_err(),
        "a heartbeat must not push a new desired state"
    );

    // Leaving withdraws the host from its peers.
    a.leave(LeaveRequest { host: "a".into() })
        .await
        .expect("leave");
    let after = next_state(&mut watch_b, Duration::from_secs(1)).await;
    assert!(after.peers.is_empty());
    // a's own stream ends with FAILED_PRECONDITION.
    let end = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            match watch_a.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("a's stream ends");
    assert_eq!(end, Some(Code::FailedPrecondition));
    assert_eq!(lab.host("a").await.state, "left");
    assert_eq!(lab.host("a").await.subnet, "");
}

#[tokio::test]
async fn silent_host_is_lost_then_returns_with_same_subnet() {
    let lab = Lab::start().await;
    let mut a = lab.agent("a").await;
    let mut b = lab.agent("b").await;
    let ra = register(&mut a, "a").await;
    register(&mut b, "b").await;
    let beat_b = heartbeat(b.clone(), "b");
    let mut watch_b = b
        .watch(WatchRequest { host: "b".into() })
        .await
        .expect("watch")
        .into_inner();
    let mut watch_a = a
        .watch(WatchRequest { host: "a".into() })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(
        peer_names(&next_state(&mut watch_b, Duration::from_secs(1)).await),
        ["a"]
    );
    assert_eq!(
        peer_names(&next_state(&mut watch_a, Duration::from_secs(1)).await),
        ["b"]
    );

    // a stays silent: lost after the grace period, withdrawn from b's peers.
    let silent_since = Instant::now();
    let without_a = wait_state(&mut watch_b, GRACE + Duration::from_secs(2), |s| {
        s.peers.is_empty()
    })
    .await;
    let took = silent_since.elapsed();
    assert!(without_a.peers.is_empty());
    assert!(
        took >= GRACE - Duration::from_millis(100),
        "lost too early: {took:?}"
    );
    let host_a = lab.host("a").await;
    assert_eq!(host_a.state, "lost");
    assert_eq!(host_a.subnet, ra.subnet, "a lost host keeps its lease");
    assert!(host_a.heartbeat_age_ms >= 1000);
    assert_eq!(lab.host("b").await.state, "ready");

    // a's own watch is unaffected: nothing about its peers changed.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), watch_a.message())
            .await
            .is_err()
    );

    // A subnet held by a lost host is not given to anyone else.
    let mut c = lab.agent("c").await;
    let rc = register(&mut c, "c").await;
    assert_ne!(rc.subnet, ra.subnet);

    // a reports again: ready, same subnet, back in b's peers.
    a.report(report("a")).await.expect("report");
    let back = wait_state(&mut watch_b, Duration::from_secs(1), |s| {
        peer_names(s).contains(&"a".to_owned())
    })
    .await;
    let pa = back.peers.iter().find(|p| p.name == "a").expect("a");
    assert_eq!(pa.subnet, ra.subnet);
    assert_eq!(lab.host("a").await.state, "ready");
    beat_b.abort();
}

#[tokio::test]
async fn restart_keeps_hosts_leases_and_controller_id() {
    let mut lab = Lab::start().await;
    let id = lab.controller().controller_id().to_owned();
    let (ra, rb) = {
        let mut a = lab.agent("a").await;
        let mut b = lab.agent("b").await;
        let ra = register(&mut a, "a").await;
        let rb = register(&mut b, "b").await;
        // A watch open across the restart ends with UNAVAILABLE.
        let mut w = a
            .watch(WatchRequest { host: "a".into() })
            .await
            .expect("watch")
            .into_inner();
        next_state(&mut w, Duration::from_secs(1)).await;
        let stopped = Instant::now();
        lab.stop().await;
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "shutdown took {:?}",
            stopped.elapsed()
        );
        let end = tokio::time::timeout(Duration::from_secs(1), w.message())
            .await
            .expect("stream ends");
        match end {
            Err(status) => assert_eq!(status.code(), Code::Unavailable),
            Ok(None) => {}
            Ok(Some(s)) => panic!("unexpected state {s:?}"),
        }
        (ra, rb)
    };
    lab.boot().await;
    assert_eq!(lab.controller().controller_id(), id);
    let hosts = lab.list_hosts().await;
    assert_eq!(hosts.len(), 2);
    assert_eq!(hosts[0].subnet, ra.subnet);
    assert_eq!(hosts[1].subnet, rb.subnet);
    assert!(hosts.iter().all(|h| h.state == "ready"));
    // Agents reconnect and get the same leases back; a new host gets a new one.
    let mut a = lab.agent("a").await;
    let again = register(&mut a, "a").await;
    assert_eq!(again.subnet, ra.subnet);
    assert_eq!(again.controller_id, id);
    let mut c = lab.agent("c").await;
    let rc = register(&mut c, "c").await;
    assert!(rc.subnet != ra.subnet && rc.subnet != rb.subnet);
    // A host that did not come back is lost after a grace period from the restart.
    tokio::time::sleep(GRACE + Duration::from_millis(600)).await;
    assert_eq!(lab.host("b").await.state, "lost");
}

#[tokio::test]
async fn second_controller_on_the_same_state_dir_is_refused() {
    let lab = Lab::start().await;
    let mut config = lab.config();
    config.listen = "127.0.0.1:0".parse().expect("addr");
    let err = geomx_controller::start(config)
        .await
        .expect_err("the state dir is held");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
}

#[tokio::test]
async fn pinned_subnets_and_underlay_conflicts() {
    let lab = Lab::start().await;
    let mut a = lab.agent("a").await;
    let mut b = lab.agent("b").await;
    let mut req = register_request("a");
    req.pinned_subnet = "172.17.50.0/24".into();
    let ra = a.register(req).await.expect("pinned").into_inner();
    assert_eq!(ra.subnet, "172.17.50.0/24");

    let mut req = register_request("b");
    req.pinned_subnet = "172.17.50.0/24".into();
    let err = b.register(req).await.expect_err("taken");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("\"a\""), "{}", err.message());

    for (pinned, needle) in [
        ("10.9.0.0/24", "outside the cluster CIDR"),
        ("172.17.60.0/25", "must be a /24"),
        ("172.17.60.7/24", "did you mean 172.17.60.0/24"),
        ("garbage", "not an IPv4 CIDR"),
    ] {
        let mut req = register_request("b");
        req.pinned_subnet = pinned.into();
        let err = b.register(req).await.expect_err(pinned);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{pinned}: {}",
            err.message()
        );
        assert!(
            err.message().contains(needle),
            "{pinned}: {}",
            err.message()
        );
    }

    // b may not use a's underlay address while a is live.
    let mut req = register_request("b");
    req.underlay_ip = "10.1.1.1".into();
    let err = b.register(req).await.expect_err("underlay in use");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("10.1.1.1"));
    assert_eq!(lab.list_hosts().await.len(), 1);
}

#[tokio::test]
async fn agents_are_authenticated_by_certificate() {
    let lab = Lab::start().await;

    // An agent certificate for another host: refused.
    let mut a = lab.agent("a").await;
    let err = a
        .register(register_request("b"))
        .await
        .expect_err("CN != host");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("CN=a"), "{}", err.message());
    for call in [
        a.watch(WatchRequest { host: "b".into() }).await.map(|_| ()),
        a.report(report("b")).await.map(|_| ()),
        a.leave(LeaveRequest { host: "b".into() }).await.map(|_| ()),
    ] {
        assert_eq!(call.expect_err("CN != host").code(), Code::PermissionDenied);
    }

    // No client certificate (a user), even with a valid token: refused.
    let channel = lab.channel(Some(lab.ca_only_tls())).await.expect("connect");
    let mut anon = AgentServiceClient::new(channel.clone());
    let err = anon
        .register(register_request("a"))
        .await
        .expect_err("no cert");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut with_token = AgentServiceClient::with_interceptor(
        channel,
        geomx_proto::tls::BearerInterceptor::new(&lab.pki.token).expect("token"),
    );
    let err = with_token
        .register(register_request("a"))
        .await
        .expect_err("a token does not grant the agent API");
    assert_eq!(err.code(), Code::Unauthenticated);

    // The controller's own certificate is not an agent certificate.
    let ctl = TlsMaterial::from_pem(
        std::fs::read(&lab.pki.ca).expect("ca"),
        std::fs::read(&lab.pki.controller_cert).expect("cert"),
        std::fs::read(&lab.pki.controller_key).expect("key"),
    )
    .expect("material");
    let mut as_controller = AgentServiceClient::new(
        lab.channel(Some(ctl.client_config()))
            .await
            .expect("connect"),
    );
    let mut req = register_request("a");
    req.host = "geomx-controller".into();
    let err = as_controller
        .register(req)
        .await
        .expect_err("not an agent cert");
    assert_eq!(err.code(), Code::PermissionDenied);

    // A certificate from another CA: the TLS handshake fails.
    let rogue = CertificateAuthority::generate("rogue CA", 30).expect("ca");
    let issued = rogue
        .issue_agent("a", "10.1.1.1".parse().expect("ip"), &[], 30)
        .expect("cert");
    let rogue_tls = TlsMaterial::from_pem(
        std::fs::read(&lab.pki.ca).expect("ca"),
        issued.cert_pem.clone(),
        issued.key_pem.clone(),
    )
    .expect("material")
    .client_config();
    let refused = match lab.channel(Some(rogue_tls)).await {
        Err(_) => true,
        Ok(channel) => AgentServiceClient::new(channel)
            .register(register_request("a"))
            .await
            .is_err(),
    };
    assert!(refused, "a certificate of another CA must be refused");

    // A client that does not trust our CA refuses the controller.
    let other_ca = geomx_proto::tls::client_config_ca_only(rogue.cert_pem().as_bytes());
    let refused = match lab.channel(Some(other_ca)).await {
        Err(_) => true,
        Ok(channel) => AgentServiceClient::new(channel)
            .register(register_request("a"))
            .await
            .is_err(),
    };
    assert!(refused);

    // Plaintext to the TLS port: refused.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", lab.addr))
        .expect("url")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2));
    if let Ok(channel) = plain.connect().await {
        assert!(
            AgentServiceClient::new(channel)
                .register(register_request("a"))
                .await
                .is_err()
        );
    }

    assert!(lab.list_hosts().await.is_empty(), "nothing was registered");
}

#[tokio::test]
async fn users_are_authenticated_by_token() {
    let lab = Lab::start().await;

    // Valid token.
    assert!(lab.list_hosts().await.is_empty());

    // Wrong token.
    let err = lab
        .user_hosts("not-the-token-0123456789")
        .await
        .list_hosts(ListHostsRequest {})
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // No token.
    let channel = lab.channel(Some(lab.ca_only_tls())).await.expect("connect");
    let err = HostServiceClient::new(channel)
        .list_hosts(ListHostsRequest {})
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);

    // An agent certificate without a token cannot use the user API.
    let channel = lab
        .channel(Some(lab.agent_tls("a")))
        .await
        .expect("connect");
    let err = HostServiceClient::new(channel.clone())
        .list_hosts(ListHostsRequest {})
        .await
        .expect_err("agent cert on user API");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = geomx_proto::v1::job_service_client::JobServiceClient::new(channel)
        .list_jobs(ListJobsRequest {})
        .await
        .expect_err("agent cert on job API");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Jobs: authorized callers reach the service.
    let jobs = lab
        .user_jobs(&lab.pki.token)
        .await
        .list_jobs(ListJobsRequest {})
        .await
        .expect("authorized")
        .into_inner()
        .jobs;
    assert!(jobs.is_empty());
    let err = lab
        .user_jobs("not-the-token-0123456789")
        .await
        .list_jobs(ListJobsRequest {})
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn malformed_requests_get_status_errors() {
    let lab = Lab::start().await;
    let mut a = lab.agent("a").await;
    let huge = "x".repeat(1 << 20);

    let cases: Vec<(RegisterRequest, &str)> = vec![
        (
            RegisterRequest {
                underlay_ip: "not-an-ip".into(),
                ..register_request("a")
            },
            "underlay_ip",
        ),
        (
            RegisterRequest {
                underlay_ip: "".into(),
                ..register_request("a")
            },
            "underlay_ip",
        ),
        (
            RegisterRequest {
                underlay_ip: "172.17.0.9".into(),
                ..register_request("a")
            },
            "inside the cluster CIDR",
        ),
        (
            RegisterRequest {
                underlay_ip: "0.0.0.0".into(),
                ..register_request("a")
            },
            "underlay_ip",
        ),
        (
            RegisterRequest {
                agent_version: huge.clone(),
                ..register_request("a")
            },
            "agent_version",
        ),
        (
            RegisterRequest {
                agent_version: "v1\u{0}".into(),
                ..register_request("a")
            },
            "control characters",
        ),
        (
            RegisterRequest {
                agent_url: "ftp://x".into(),
                ..register_request("a")
            },
            "agent_url",
        ),
        (
            RegisterRequest {
                pinned_subnet: huge.clone(),
                ..register_request("a")
            },
            "pinned_subnet",
        ),
    ];
    for (req, needle) in cases {
        let err = a.register(req).await.expect_err(needle);
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{needle}: {}",
            err.message()
        );
        assert!(
            err.message().contains(needle),
            "{needle}: {}",
            err.message()
        );
        assert!(err.message().len() < 500, "errors do not echo huge input");
    }

    // A huge host name with a valid certificate: refused, not echoed whole.
    let err = a
        .register(RegisterRequest {
            host: huge.clone(),
            ..register_request("a")
        })
        .await
        .expect_err("huge host");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().len() < 500);

    // Larger than the message size limit.
    let err = a
        .register(RegisterRequest {
            agent_version: "y".repeat(5 << 20),
            ..register_request("a")
        })
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::Internal
        ),
        "{err:?}"
    );

    // Unknown host (certificate d, never registered).
    let mut d = lab.agent("d").await;
    assert_eq!(
        d.report(report("d")).await.expect_err("unknown").code(),
        Code::NotFound
    );
    assert_eq!(
        d.watch(WatchRequest { host: "d".into() })
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        d.leave(LeaveRequest { host: "d".into() })
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );

    // Bad report contents.
    register(&mut a, "a").await;
    let err = a
        .report(HostReport {
            images: vec!["i".into(); 5000],
            ..report("a")
        })
        .await
        .expect_err("too many images");
    assert_eq!(err.code(), Code::InvalidArgument);

    // A rich, valid report is accepted and shown.
    a.report(HostReport {
        host: "a".into(),
        applied_revision: 3,
        nodes: vec![NodeStatus {
            job: "j".into(),
            node: "n".into(),
            state: ContainerState::Running as i32,
            ..Default::default()
        }],
        images: vec!["geomx/psnode:test".into()],
        network: Some(NetworkStatus {
            converged: true,
            routes: 0,
            error: huge.clone(),
            ..Default::default()
        }),
        agent_version: "test-agent 0.2".into(),
        listening_ports: vec![9092, 22, 22],
        // as an agent from before these fields sends it: absent means known
        nodes_known: None,
        images_known: None,
        memory_bytes: 8 << 30,
        cpus: 4,
        image_details: Vec::new(),
        pulls: Vec::new(),
        omitted: Vec::new(),
        full_size_bytes: 0,
    })
    .await
    .expect("report");
    let view = lab.controller().membership().host("a").expect("a");
    assert_eq!(view.listening_ports, [22, 9092]);
    assert_eq!(view.record.images, ["geomx/psnode:test"]);
    let err = a
        .report(HostReport {
            listening_ports: vec![70_000],
            ..report("a")
        })
        .await
        .expect_err("bad port");
    assert_eq!(err.code(), Code::InvalidArgument);
    let host = lab.host("a").await;
    assert!(host.network_converged);
    assert_eq!(host.containers, 1);
    assert_eq!(host.agent_version, "test-agent 0.2");

    // An agent that has not adopted its containers nor listed its images yet (restarted
    // while Docker is slow): the last known ones stay.
    a.report(HostReport {
        nodes_known: Some(false),
        images_known: Some(false),
        agent_version: "test-agent 0.2".into(),
        ..report("a")
    })
    .await
    .expect("report");
    let host = lab.host("a").await;
    assert_eq!(host.images, ["geomx/psnode:test"]);
    assert_eq!(host.containers, 1);

    // The controller is still fine.
    assert_eq!(lab.list_hosts().await.len(), 1);
}

#[tokio::test]
async fn insecure_mode_trusts_names_and_validates_them() {
    let lab = Lab::start_insecure().await;
    let mut a = lab.agent("a").await;
    let ra = register(&mut a, "a").await;
    assert!(!ra.subnet.is_empty());
    let huge = "x".repeat(1 << 20);
    for bad in [huge.as_str(), "", "UPPER", "-a", "a.b"] {
        let err = a
            .register(RegisterRequest {
                host: bad.into(),
                ..register_request("a")
            })
            .await
            .expect_err("bad host name");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().len() < 500);
    }
    // Tokens are still checked when configured.
    let err = lab
        .user_hosts("not-the-token-0123456789")
        .await
        .list_hosts(ListHostsRequest {})
        .await
        .expect_err("wrong token");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(lab.list_hosts().await.len(), 1);
}

#[tokio::test]
async fn health_and_reflection_need_no_credentials() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let lab = Lab::start().await;
    let channel = lab.channel(Some(lab.ca_only_tls())).await.expect("connect");
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "geomx.v1.AgentService", "geomx.v1.HostService"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health")
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.expect("ok").expect("a response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "geomx.v1.AgentService",
        "geomx.v1.HostService",
        "geomx.v1.JobService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
}

/// The cluster's `backend` (controller.toml) is in every host's desired state, from the
/// first one on; the default is "auto".
#[tokio::test]
async fn the_configured_backend_reaches_every_hosts_desired_state() {
    for backend in ["wireguard", "vxlan", "auto"] {
        let mut lab = Lab::start().await;
        lab.stop().await;
        let mut config = lab.config();
        assert_eq!(config.backend, "auto", "the default");
        config.backend = backend.into();
        let running = geomx_controller::start_with_options(config, lab.job_options.clone())
            .await
            .expect("controller starts");
        lab.addr = running.local_addr();
        lab.controller = Some(running);

        let hosts = ["a", "b", "c"];
        let mut streams = Vec::new();
        for h in hosts {
            let mut client = lab.agent(h).await;
            register(&mut client, h).await;
            let stream = client
                .watch(WatchRequest { host: h.into() })
                .await
                .expect("watch")
                .into_inner();
            streams.push((h, client, stream));
        }
        for (h, _client, stream) in &mut streams {
            // every state carries it, from the first to the one naming every peer
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let state =
                    next_state(stream, deadline.saturating_duration_since(Instant::now())).await;
                assert_eq!(state.host, *h);
                assert_eq!(
                    state.backend, backend,
                    "{h}'s desired state revision {}",
                    state.revision
                );
                if state.peers.len() == hosts.len() - 1 {
                    break;
                }
            }
        }
        lab.stop().await;
    }
}
