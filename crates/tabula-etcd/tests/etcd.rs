//! The client against real etcd processes (tabula_etcd::testing::EtcdCluster).

use std::time::{Duration, Instant};

use tabula_etcd::testing::EtcdCluster;
use tabula_etcd::{Compare, EtcdError, Event, Op, prefix_end};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Polls `f` every 100 ms until it returns `Some`, for at most `within`.
async fn poll<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn put_get_range_delete() {
    let Some(cluster) = EtcdCluster::try_start(1) else {
        return;
    };
    let etcd = cluster.client(TIMEOUT).await;
    assert_eq!(etcd.get(b"/t/a").await.unwrap(), None);

    let r1 = etcd.put(b"/t/a", b"1", 0).await.unwrap();
    let r2 = etcd.put(b"/t/b", b"2", 0).await.unwrap();
    let r3 = etcd.put(b"/t/c", b"3", 0).await.unwrap();
    etcd.put(b"/u/x", b"outside", 0).await.unwrap();
    assert!(r1 < r2 && r2 < r3, "revisions grow: {r1} {r2} {r3}");

    let a = etcd.get(b"/t/a").await.unwrap().expect("/t/a exists");
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"1"[..], r1, r1)
    );
    assert_eq!(a.lease, 0);
    let r4 = etcd.put(b"/t/a", b"one", 0).await.unwrap();
    let a = etcd.get(b"/t/a").await.unwrap().unwrap();
    assert_eq!(
        (a.value.as_slice(), a.create_revision, a.mod_revision),
        (&b"one"[..], r1, r4)
    );

    let (kvs, rev) = etcd.range(b"/t/", &prefix_end(b"/t/"), 0).await.unwrap();
    let keys: Vec<&[u8]> = kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [&b"/t/a"[..], b"/t/b", b"/t/c"]);
    assert_eq!(rev, r4, "the header revision is the store's latest");
    let (kvs, _) = etcd.range(b"/t/", &prefix_end(b"/t/"), 2).await.unwrap();
    assert_eq!(kvs.len(), 2, "limit");
    let (kvs, _) = etcd.range(b"/t/b", b"/t/c", 0).await.unwrap();
    assert_eq!(kvs.len(), 1, "[from, to) excludes to");

    let r5 = etcd.delete_range(b"/t/a", b"/t/c").await.unwrap();
    assert!(r5 > r4);
    let (kvs, _) = etcd.range(b"/t/", &prefix_end(b"/t/"), 0).await.unwrap();
    assert_eq!(kvs.len(), 1);
    assert_eq!(kvs[0].key, b"/t/c");
    etcd.delete_range(b"/t/c", b"").await.unwrap();
    assert_eq!(
        etcd.get(b"/t/c").await.unwrap(),
        None,
        "empty `to` is one key"
    );
    assert!(etcd.get(b"/u/x").await.unwrap().is_some());

    // A request over etcd's limit is refused with an answer, not retried as unavailable.
    let big = vec![7u8; 3 * 1024 * 1024];
    match etcd.put(b"/t/big", &big, 0).await {
        Err(EtcdError::Failed(msg)) => assert!(!msg.is_empty()),
        other => panic!("a 3 MiB put: {other:?}"),
    }
}

#[tokio::test]
async fn txn_create_once() {
    let Some(cluster) = EtcdCluster::try_start(1) else {
        return;
    };
    let etcd = cluster.client(TIMEOUT).await;
    etcd.put(b"/other", b"o", 0).await.unwrap();
    let create = || {
        (
            vec![Compare::CreateRevision(b"/leader".to_vec(), 0)],
            vec![
                Op::Put {
                    key: b"/leader".to_vec(),
                    value: b"me".to_vec(),
                    lease: 0,
                },
                Op::Get(b"/other".to_vec()),
            ],
            vec![Op::Get(b"/leader".to_vec()), Op::Get(b"/absent".to_vec())],
        )
    };
    let (when, then, otherwise) = create();
    let first = etcd.txn(when, then, otherwise).await.unwrap();
    assert!(first.succeeded);
    assert_eq!(first.gets.len(), 1);
    assert_eq!(first.gets[0].as_ref().unwrap().value, b"o");

    let (when, then, otherwise) = create();
    let second = etcd.txn(when, then, otherwise).await.unwrap();
    assert!(!second.succeeded, "the key exists now");
    assert_eq!(
        second.revision, first.revision,
        "a failed txn writes nothing"
    );
    assert_eq!(second.gets.len(), 2);
    let leader = second.gets[0].as_ref().expect("/leader exists");
    assert_eq!(leader.value, b"me");
    assert_eq!(leader.create_revision, first.revision);
    assert!(second.gets[1].is_none());

    // Compare by mod revision and value; delete ops.
    let ok = etcd
        .txn(
            vec![
                Compare::ModRevision(b"/leader".to_vec(), first.revision),
                Compare::Value(b"/leader".to_vec(), b"me".to_vec()),
            ],
            vec![
                Op::Delete(b"/leader".to_vec()),
                Op::DeleteRange(b"/o".to_vec(), b"/p".to_vec()),
            ],
            vec![],
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    assert!(ok.gets.is_empty());
    assert_eq!(etcd.get(b"/leader").await.unwrap(), None);
    assert_eq!(etcd.get(b"/other").await.unwrap(), None);
    let wrong = etcd
        .txn(
            vec![Compare::Value(b"/leader".to_vec(), b"me".to_vec())],
            vec![],
            vec![],
        )
        .await
        .unwrap();
    assert!(!wrong.succeeded, "an absent key has no value");
}

#[tokio::test]
async fn lease_expires_unless_kept_alive() {
    let Some(cluster) = EtcdCluster::try_start(1) else {
        return;
    };
    let etcd = cluster.client(TIMEOUT).await;
    let dropped = etcd.lease_grant(2).await.unwrap();
    let kept = etcd.lease_grant(2).await.unwrap();
    assert_ne!(dropped, kept);
    etcd.put(b"/l/dropped", b"x", dropped).await.unwrap();
    etcd.put(b"/l/kept", b"y", kept).await.unwrap();
    assert_eq!(etcd.get(b"/l/kept").await.unwrap().unwrap().lease, kept);

    // Keep one lease alive for two TTLs; the other's key must go meanwhile.
    let start = Instant::now();
    let mut dropped_gone = false;
    while start.elapsed() < Duration::from_secs(4) {
        let ttl = etcd.lease_keep_alive(kept).await.unwrap();
        assert!(ttl > 0, "a kept lease has time left");
        assert!(
            etcd.get(b"/l/kept").await.unwrap().is_some(),
            "the kept lease's key vanished after {:?}",
            start.elapsed()
        );
        dropped_gone |= etcd.get(b"/l/dropped").await.unwrap().is_none();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        dropped_gone,
        "the key of a lease not kept alive outlived two TTLs"
    );
    assert_eq!(
        etcd.lease_keep_alive(dropped).await.unwrap(),
        0,
        "expired lease"
    );

    etcd.lease_revoke(kept).await.unwrap();
    assert_eq!(
        etcd.get(b"/l/kept").await.unwrap(),
        None,
        "revoke deletes the keys"
    );
    assert_eq!(etcd.lease_keep_alive(kept).await.unwrap(), 0);
    etcd.lease_revoke(kept).await.unwrap();
}

#[tokio::test]
async fn watch_sees_puts_and_deletes_in_order() {
    let Some(cluster) = EtcdCluster::try_start(1) else {
        return;
    };
    let etcd = cluster.client(TIMEOUT).await;
    let r1 = etcd.put(b"/w/a", b"1", 0).await.unwrap();
    etcd.put(b"/x/outside", b"-", 0).await.unwrap();
    let r2 = etcd.put(b"/w/b", b"2", 0).await.unwrap();
    let r3 = etcd.delete_range(b"/w/a", b"").await.unwrap();

    // From a past revision: the history, in order, only inside the range.
    let mut watch = etcd.watch(b"/w/", &prefix_end(b"/w/"), r1).await.unwrap();
    let mut seen = Vec::new();
    let mut last_rev = 0;
    while seen.len() < 3 {
        let (rev, events) = tokio::time::timeout(TIMEOUT, watch.next())
            .await
            .expect("watch events in time")
            .unwrap()
            .expect("an open watch");
        assert!(rev > last_rev);
        assert_eq!(rev, events.last().unwrap().revision());
        last_rev = rev;
        seen.extend(events);
    }
    match &seen[..] {
        [Event::Put(a), Event::Put(b), Event::Delete(d)] => {
            assert_eq!(
                (a.key.as_slice(), a.value.as_slice(), a.mod_revision),
                (&b"/w/a"[..], &b"1"[..], r1)
            );
            assert_eq!((b.key.as_slice(), b.mod_revision), (&b"/w/b"[..], r2));
            assert_eq!((d.key.as_slice(), d.mod_revision), (&b"/w/a"[..], r3));
        }
        other => panic!("unexpected events {other:?}"),
    }

    // Live events continue in the same watch.
    let r4 = etcd.put(b"/w/c", b"3", 0).await.unwrap();
    let (rev, events) = tokio::time::timeout(TIMEOUT, watch.next())
        .await
        .expect("a live event in time")
        .unwrap()
        .unwrap();
    assert_eq!(rev, r4);
    assert!(matches!(&events[..], [Event::Put(kv)] if kv.key == b"/w/c"));

    // From now (0): only later changes; a single-key watch.
    let mut now = etcd.watch(b"/w/b", b"", 0).await.unwrap();
    etcd.put(b"/w/c", b"4", 0).await.unwrap();
    let r6 = etcd.put(b"/w/b", b"5", 0).await.unwrap();
    let (rev, events) = tokio::time::timeout(TIMEOUT, now.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(rev, r6);
    assert!(matches!(&events[..], [Event::Put(kv)] if kv.value == b"5"));
    now.cancel();
    assert!(
        now.next().await.unwrap().is_none(),
        "a cancelled watch ends"
    );

    // Compacted history: the watch says so instead of skipping events.
    etcd.compact(r6).await.unwrap();
    let mut old = etcd.watch(b"/w/", &prefix_end(b"/w/"), r1).await.unwrap();
    match tokio::time::timeout(TIMEOUT, old.next()).await.unwrap() {
        Err(EtcdError::Compacted(rev)) => assert_eq!(rev, r6),
        other => panic!("a watch from a compacted revision: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_quorum_loss() {
    let Some(mut cluster) = EtcdCluster::try_start(3) else {
        return;
    };
    let etcd = cluster.client(TIMEOUT).await;
    etcd.put(b"/f/k", b"0", 0).await.unwrap();
    let mut watch = etcd.watch(b"/f/", &prefix_end(b"/f/"), 0).await.unwrap();
    assert_eq!(
        watch.endpoint(),
        cluster.endpoints()[0],
        "calls start at the first endpoint"
    );

    // One member down (the one the client uses): calls keep working on the others.
    cluster.kill(0);
    let broken = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("a watch on a killed member ends instead of hanging");
    assert!(
        matches!(broken, Err(EtcdError::Unavailable(_))),
        "{broken:?}"
    );
    for i in 1..=5 {
        let value = format!("{i}");
        let start = Instant::now();
        etcd.put(b"/f/k", value.as_bytes(), 0)
            .await
            .unwrap_or_else(|e| panic!("put {i} with one member down: {e}\n{}", cluster.logs()));
        assert!(start.elapsed() <= TIMEOUT);
        assert_eq!(
            etcd.get(b"/f/k").await.unwrap().unwrap().value,
            value.as_bytes()
        );
    }
    let lease = etcd.lease_grant(5).await.unwrap();
    assert!(etcd.lease_keep_alive(lease).await.unwrap() > 0);
    let mut watch = etcd.watch(b"/f/", &prefix_end(b"/f/"), 0).await.unwrap();
    assert_ne!(watch.endpoint(), cluster.endpoints()[0]);
    let rev = etcd.put(b"/f/w", b"w", 0).await.unwrap();
    let (seen, _) = tokio::time::timeout(TIMEOUT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen, rev);

    let status = etcd.member_status().await;
    assert_eq!(status.len(), 3);
    assert!(
        matches!(status[0].1, Err(EtcdError::Unavailable(_))),
        "{:?}",
        status[0]
    );
    let up: Vec<_> = status[1..]
        .iter()
        .map(|(_, s)| s.as_ref().unwrap().clone())
        .collect();
    assert_ne!(up[0].member_id, up[1].member_id);
    assert_eq!(up.iter().filter(|s| s.is_leader).count(), 1, "{up:?}");
    assert!(up[0].version.starts_with('3'));
    assert_eq!(etcd.members().await.unwrap().len(), 3);

    // A watch on the member that will be left alone.
    let lone = tabula_etcd::Etcd::connect(&cluster.endpoints()[2..], TIMEOUT)
        .await
        .unwrap();
    let mut lone_watch = lone.watch(b"/f/", &prefix_end(b"/f/"), 0).await.unwrap();

    // Two of three down: no quorum. A put fails as unavailable within the timeout.
    cluster.kill(1);
    let start = Instant::now();
    match etcd.put(b"/f/k", b"lost", 0).await {
        Err(EtcdError::Unavailable(msg)) => {
            assert!(msg.contains("is etcd running at"), "{msg}")
        }
        other => panic!("a put without quorum: {other:?}"),
    }
    let took = start.elapsed();
    assert!(
        took <= TIMEOUT + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(
        etcd.get(b"/f/k").await.is_err(),
        "a linearizable read needs quorum too"
    );
    // The lone member cancels watches once it has had no leader for a while (etcd's
    // `hasleader` watches), so a cut-off watcher learns it.
    match tokio::time::timeout(Duration::from_secs(10), lone_watch.next()).await {
        Ok(Err(EtcdError::Unavailable(msg))) => assert!(msg.contains("no leader"), "{msg}"),
        other => panic!("a watch on a member without a leader: {other:?}"),
    }

    // A call waits for quorum within its timeout: one issued now succeeds once a member
    // comes back.
    let patient = tabula_etcd::Etcd::connect(&cluster.endpoints(), Duration::from_secs(20))
        .await
        .unwrap();
    let pending = tokio::spawn(async move { patient.put(b"/f/k", b"back", 0).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pending.is_finished(),
        "a put without quorum waits out its timeout"
    );
    cluster.start_member(1);
    let value = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .expect("the pending put ends within its timeout")
        .unwrap()
        .unwrap_or_else(|e| panic!("the put after quorum returned: {e}\n{}", cluster.logs()));
    assert!(value > rev);
    assert_eq!(etcd.get(b"/f/k").await.unwrap().unwrap().value, b"back");
    // The restarted member's connection recovers.
    poll(
        Duration::from_secs(10),
        "the restarted member's status",
        || {
            let etcd = etcd.clone();
            async move { etcd.member_status().await[1].1.as_ref().ok().map(|_| ()) }
        },
    )
    .await;
}

#[tokio::test]
async fn unreachable_endpoints_are_unavailable_in_time() {
    // No etcd needed: nothing listens on these ports.
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("127.0.0.1:{}", l.local_addr().unwrap().port())
        })
        .collect();
    let etcd = tabula_etcd::Etcd::connect(&ports, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(etcd.endpoints()[0], format!("http://{}", ports[0]));
    let start = Instant::now();
    match etcd.get(b"k").await {
        Err(EtcdError::Unavailable(msg)) => {
            assert!(msg.contains(&ports[1]), "names the endpoints: {msg}")
        }
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < Duration::from_millis(1500));
    assert!(matches!(
        tabula_etcd::Etcd::connect(&[], Duration::from_secs(1)).await,
        Err(EtcdError::Config(_))
    ));
}

#[tokio::test]
async fn leader_killed_calls_continue() {
    let Some(mut cluster) = EtcdCluster::try_start(3) else {
        return;
    };
    let probe = cluster.client(TIMEOUT).await;
    let leader = poll(Duration::from_secs(5), "a leader", || {
        let probe = probe.clone();
        async move {
            let status = probe.member_status().await;
            status
                .iter()
                .position(|(_, s)| s.as_ref().is_ok_and(|s| s.is_leader))
        }
    })
    .await;
    // The client starts at the leader's endpoint.
    let mut endpoints = cluster.endpoints();
    endpoints.rotate_left(leader);
    let etcd = tabula_etcd::Etcd::connect(&endpoints, TIMEOUT)
        .await
        .unwrap();
    etcd.put(b"/k", b"before", 0).await.unwrap();

    // While a new leader is elected, calls wait for it (within their timeout) instead of
    // failing: the caller does not notice.
    cluster.kill(leader);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let value = format!("{n}");
        let t = Instant::now();
        etcd.put(b"/k", value.as_bytes(), 0)
            .await
            .unwrap_or_else(|e| panic!("put {n} after the leader died: {e}"));
        assert!(t.elapsed() <= TIMEOUT);
        assert_eq!(
            etcd.get(b"/k").await.unwrap().unwrap().value,
            value.as_bytes()
        );
        n += 1;
    }
    let status = etcd.member_status().await;
    let leaders = status
        .iter()
        .filter(|(_, s)| s.as_ref().is_ok_and(|s| s.is_leader))
        .count();
    assert_eq!(leaders, 1, "{status:?}");
}
