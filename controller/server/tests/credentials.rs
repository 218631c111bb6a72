//! Credentials over real TLS: roles per RPC, revoked tokens and agent certificates refused
//! without a restart (the files are watched), a bad file keeping the previous set.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Lab, register, report};
use geomx_proto::credentials::{Role, normalize_serial};
use geomx_proto::pki::token_line;
use geomx_proto::v1::{
    CancelJobRequest, HostRequest, ListHostsRequest, ListJobsRequest, WatchRequest,
};
use tonic::Code;

const ADMIN: &str = "admin-secret-0123456789abcdef";
const SUBMIT: &str = "ci-secret-0123456789abcdef";
const READ: &str = "ro-secret-0123456789abcdef";

/// A TLS lab whose controller reads a tokens file (alice admin, ci submit, ro read) and a
/// revocation file, polled every 100 ms.
async fn lab_with_files() -> (Lab, PathBuf, PathBuf) {
    let mut lab = Lab::start().await;
    lab.stop().await;
    let tokens = lab.dir.path().join("tokens");
    let revoked = lab.dir.path().join("revoked");
    std::fs::write(
        &tokens,
        format!(
            "{}{}{}",
            token_line("alice", Role::Admin, ADMIN),
            token_line("ci", Role::Submit, SUBMIT),
            token_line("ro", Role::Read, READ)
        ),
    )
    .unwrap();
    std::fs::write(&revoked, "# nothing revoked\n").unwrap();
    let mut config = lab.config();
    config.tokens = Vec::new();
    config.tokens_file = Some(tokens.clone());
    config.revocation_file = Some(revoked.clone());
    config.credentials_poll = Duration::from_millis(100);
    let running = geomx_controller::start_with_options(config, lab.job_options.clone())
        .await
        .expect("controller starts");
    lab.addr = running.local_addr();
    lab.controller = Some(running);
    (lab, tokens, revoked)
}

/// Polls `f` every 50 ms until it is true; the time it took, or a panic after `within`.
async fn within<F, Fut>(what: &str, within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn each_role_may_do_what_it_is_for() {
    let (lab, _, _) = lab_with_files().await;
    let cancel = || CancelJobRequest {
        name: "nosuchjob".into(),
    };
    // read: looks, cannot cancel; the refusal names the token, its role and the role needed
    let mut ro = lab.user_jobs(READ).await;
    ro.list_jobs(ListJobsRequest {}).await.expect("read lists");
    let err = ro.cancel_job(cancel()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert_eq!(
        err.message(),
        "token \"ro\" has role read: JobService/CancelJob needs role submit (or admin)"
    );
    let mut ro_hosts = lab.user_hosts(READ).await;
    ro_hosts
        .list_hosts(ListHostsRequest {})
        .await
        .expect("read lists hosts");
    // submit: may cancel (here: no such job), may not cordon
    let mut ci = lab.user_jobs(SUBMIT).await;
    let err = ci.cancel_job(cancel()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut ci_hosts = lab.user_hosts(SUBMIT).await;
    let err = ci_hosts
        .cordon_host(HostRequest { name: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("needs role admin"), "{err:?}");
    // admin: may cordon (here: no such host)
    let mut admin_hosts = lab.user_hosts(ADMIN).await;
    let err = admin_hosts
        .cordon_host(HostRequest { name: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn a_revoked_token_is_refused_without_restart_and_a_bad_list_changes_nothing() {
    let (lab, tokens, revoked) = lab_with_files().await;
    let mut ci = lab.user_jobs(SUBMIT).await;
    ci.list_jobs(ListJobsRequest {}).await.expect("ci works");

    std::fs::write(&revoked, "token ci  # leaked in a CI log\n").unwrap();
    let took = within("the revoked token refused", Duration::from_secs(5), || {
        let mut ci = ci.clone();
        async move {
            matches!(ci.list_jobs(ListJobsRequest {}).await, Err(s)
                if s.code() == Code::Unauthenticated && s.message().contains("token \"ci\" is revoked"))
        }
    })
    .await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    // on the same connection, the others still work
    let mut ro = lab.user_jobs(READ).await;
    ro.list_jobs(ListJobsRequest {}).await.expect("ro works");

    // a bad revocation list is refused whole: ci stays revoked, nobody else is
    std::fs::write(&revoked, "token ci\nrevoke everyone\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(ci.list_jobs(ListJobsRequest {}).await.is_err());
    ro.list_jobs(ListJobsRequest {})
        .await
        .expect("ro still works");
    // a broken tokens file neither locks anyone out
    std::fs::write(&tokens, "this is not a tokens file\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    ro.list_jobs(ListJobsRequest {})
        .await
        .expect("ro still works");
    assert_eq!(
        lab.controller().credentials().snapshot().generation,
        1,
        "only the good change was applied"
    );

    // a new token appears without restart; lifting the revocation lets ci in again
    std::fs::write(
        &tokens,
        format!(
            "{}{}{}",
            token_line("ci", Role::Submit, SUBMIT),
            token_line("ro", Role::Read, READ),
            token_line("bob", Role::Read, "bob-secret-0123456789abcdef")
        ),
    )
    .unwrap();
    std::fs::write(&revoked, "").unwrap();
    within("bob and ci accepted", Duration::from_secs(5), || {
        let lab = &lab;
        let mut ci = ci.clone();
        async move {
            let mut bob = lab.user_jobs("bob-secret-0123456789abcdef").await;
            bob.list_jobs(ListJobsRequest {}).await.is_ok()
                && ci.list_jobs(ListJobsRequest {}).await.is_ok()
        }
    })
    .await;
    let mut alice = lab.user_jobs(ADMIN).await;
    let err = alice.list_jobs(ListJobsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "alice left the file");
}

#[tokio::test]
async fn a_revoked_agent_certificate_is_refused_and_its_watch_ends() {
    let (lab, _, revoked) = lab_with_files().await;
    let mut a = lab.agent("a").await;
    register(&mut a, "a").await;
    let mut stream = a
        .watch(WatchRequest { host: "a".into() })
        .await
        .expect("watch")
        .into_inner();
    common::next_state(&mut stream, Duration::from_secs(5)).await;
    a.report(report("a")).await.expect("report");
    // b keeps working throughout
    let mut b = lab.agent("b").await;
    register(&mut b, "b").await;

    let (_, cert, _) = lab.pki.agents.iter().find(|(h, _, _)| h == "a").unwrap();
    let info = geomx_proto::pki::describe_certificate(&std::fs::read(cert).unwrap()).unwrap();
    let serial = normalize_serial(&info.serial).unwrap();
    std::fs::write(&revoked, format!("serial {}\n", info.serial)).unwrap();
    let revoked_at = Instant::now();

    // the open watch stream ends with PERMISSION_DENIED (after b's arrival, maybe)
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the watch ended without a reason"),
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the watch ends in time");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("revoked"), "{err:?}");
    // reports and a new registration are refused
    let err = a.report(report("a")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains(&format!("serial {serial} is revoked")),
        "{err:?}"
    );
    assert!(a.register(common::register_request("a")).await.is_err());
    assert!(revoked_at.elapsed() < Duration::from_secs(5));
    b.report(report("b")).await.expect("b is not affected");

    // a user sees it in the host's events
    let mut hosts = lab.user_hosts(READ).await;
    let events = hosts
        .host_events(HostRequest { name: "a".into() })
        .await
        .expect("events")
        .into_inner()
        .events;
    let refused: Vec<_> = events.iter().filter(|e| e.kind == "AgentRefused").collect();
    assert_eq!(refused.len(), 1, "noted once: {events:?}");
    assert!(refused[0].message.contains(&serial), "{:?}", refused[0]);

    // lifted: the same certificate works again, no restart
    std::fs::write(&revoked, "").unwrap();
    within("a's reports accepted again", Duration::from_secs(5), || {
        let mut a = a.clone();
        async move { a.report(report("a")).await.is_ok() }
    })
    .await;
}

/// The dashboard: nothing without a session or a token; a login sets a session cookie that
/// opens the API; revoking the token ends the session at once; a wrong token is refused and
/// ten wrong ones from one address get 429.
#[tokio::test]
async fn dashboard_sessions_follow_the_tokens_and_revocations() {
    let (lab, _tokens, revoked) = lab_with_files().await;
    let (status, head, _) = lab.web("GET", "/", "", "").await;
    assert_eq!(status, 303, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("location: /login"),
        "{head}"
    );
    for path in [
        "/api/cluster",
        "/api/jobs",
        "/api/jobs/x",
        "/api/jobs/x/stream",
    ] {
        let (status, _, body) = lab.web("GET", path, "", "").await;
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("not logged in"), "{path}: {body}");
    }
    let (status, _, login_page) = lab.web("GET", "/login", "", "").await;
    assert_eq!(status, 200);
    assert!(login_page.contains("<form id=\"login\""));
    let (status, head, _) = lab.web("GET", "/assets/uPlot.iife.min.js", "", "").await;
    assert_eq!(status, 200, "assets need no session: {head}");
    assert!(
        head.contains("default-src 'self'"),
        "CSP on every response: {head}"
    );

    // a read token logs in; the cookie opens the pages and the API
    let (status, head, _) = lab
        .web("POST", "/login", "", &format!("token={READ}"))
        .await;
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(attr), "{attr} in {cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let with_cookie = format!("Cookie: {session}\r\n");
    let (status, _, body) = lab.web("GET", "/api/jobs", &with_cookie, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "{\"jobs\":[]}");
    let (status, _, body) = lab.web("GET", "/api/cluster", &with_cookie, "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sites\""), "{body}");
    let (status, _, index) = lab.web("GET", "/", &with_cookie, "").await;
    assert_eq!(status, 200);
    assert!(index.contains("/assets/app.js"));
    // the API only reads
    let (status, _, _) = lab.web("POST", "/api/jobs", &with_cookie, "x=1").await;
    assert_eq!(status, 405);
    // a bearer token works without a session, for scripts
    let (status, _, _) = lab
        .web(
            "GET",
            "/api/jobs",
            &format!("Authorization: Bearer {ADMIN}\r\n"),
            "",
        )
        .await;
    assert_eq!(status, 200);

    // revoking the token ends its session without restart
    std::fs::write(&revoked, "token ro\n").unwrap();
    within(
        "the revoked token's session refused",
        Duration::from_secs(5),
        || {
            let with_cookie = with_cookie.clone();
            let lab = &lab;
            async move {
                let (status, _, body) = lab.web("GET", "/api/jobs", &with_cookie, "").await;
                status == 401 && body.contains("revoked")
            }
        },
    )
    .await;

    // wrong tokens: refused, and ten from one address get 429 (the right one too, then)
    let (status, _, body) = lab
        .web("POST", "/login", "", "token=wrong-0123456789")
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid bearer token"), "{body}");
    for _ in 1..10 {
        lab.web("POST", "/login", "", "token=wrong-0123456789")
            .await;
    }
    let (status, _, body) = lab
        .web("POST", "/login", "", &format!("token={ADMIN}"))
        .await;
    assert_eq!(status, 429, "{body}");
    let (status, _, _) = lab
        .web("POST", "/login", "", &format!("token={}", "x".repeat(5000)))
        .await;
    assert_eq!(status, 429, "the limit comes before the body is read");
}
