//! The start-up rendezvous of a data-parallel group (`dist::rendezvous`), ranks as threads on
//! 127.0.0.1: the id reaches every rank; another configuration, group size, a duplicate or a
//! missing rank stops the group with an error that names the rank.

use std::net::TcpListener;
use std::thread;
use std::time::Duration;

use invaspread::dist::rendezvous::{join, serve, Member, UNIQUE_ID_BYTES};

const CONFIG: &str = r#"{"lr":0.03,"batch":128,"tau":0.1}"#;

fn member(rank: usize, world_size: usize, config: &str) -> Member {
    Member {
        rank,
        world_size,
        config: config.as_bytes().to_vec(),
    }
}

/// Rank 0's result, and each joiner's id, with errors as strings.
type Outcome = (Result<(), String>, Vec<Result<Vec<u8>, String>>);

/// Rank 0 serving `world` ranks while `joiners` (rank, world size, config) join; the results of
/// rank 0 and of each joiner, as strings for errors.
fn run(world: usize, joiners: &[(usize, usize, &str)], timeout: Duration) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let id = [7u8; UNIQUE_ID_BYTES];
    let server = thread::spawn(move || {
        serve(listener, &member(0, world, CONFIG), &id, timeout).map_err(|e| e.to_string())
    });
    let handles: Vec<_> = joiners
        .iter()
        .map(|&(rank, w, config)| {
            let (addr, config) = (addr.clone(), config.to_string());
            thread::spawn(move || {
                join(&addr, &member(rank, w, &config), timeout)
                    .map(|id| id.to_vec())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let joined = handles.into_iter().map(|h| h.join().unwrap()).collect();
    (server.join().unwrap(), joined)
}

#[test]
fn every_rank_gets_rank_zeros_id() {
    let (server, joined) = run(
        4,
        &[(3, 4, CONFIG), (1, 4, CONFIG), (2, 4, CONFIG)],
        Duration::from_secs(20),
    );
    server.unwrap();
    for result in joined {
        assert_eq!(result.unwrap(), vec![7u8; UNIQUE_ID_BYTES]);
    }
}

#[test]
fn another_configuration_is_named_on_both_sides() {
    let other = r#"{"lr":0.06,"batch":128,"tau":0.1}"#;
    let (server, joined) = run(2, &[(1, 2, other)], Duration::from_secs(20));
    let err = server.unwrap_err();
    assert!(
        err.contains("rank 1's configuration differs from rank 0's: lr 0.03 vs 0.06"),
        "{err}"
    );
    let err = joined[0].clone().unwrap_err();
    assert!(
        err.contains("rank 0 refused rank 1") && err.contains("lr 0.03 vs 0.06"),
        "{err}"
    );
}

#[test]
fn another_group_size_is_refused() {
    let (server, joined) = run(2, &[(1, 3, CONFIG)], Duration::from_secs(20));
    let err = server.unwrap_err();
    assert!(
        err.contains("rank 1 was started with WORLD_SIZE=3, rank 0 with WORLD_SIZE=2"),
        "{err}"
    );
    assert!(joined[0].is_err());
}

#[test]
fn a_missing_rank_is_named_within_the_timeout() {
    let started = std::time::Instant::now();
    let (server, joined) = run(3, &[(1, 3, CONFIG)], Duration::from_secs(2));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let err = server.unwrap_err();
    assert!(
        err.contains("rank(s) [2] of 3 did not join rank 0 within 2 s"),
        "{err}"
    );
    let err = joined[0].clone().unwrap_err();
    assert!(
        err.contains("refused rank 1") && err.contains("[2]"),
        "{err}"
    );
}

#[test]
fn a_rank_without_rank_zero_gives_up_at_the_timeout() {
    // A port nobody listens on: bind one, then free it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let err = join(&addr, &member(1, 2, CONFIG), Duration::from_millis(500))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rank 1 could not reach rank 0 at"), "{err}");
}

/// Rank 0's error after a connection that sends `greeting` and nothing else.
fn serve_against(greeting: &[u8]) -> String {
    use std::io::Write;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let own = member(0, 2, CONFIG);
    let server = thread::spawn(move || {
        serve(
            listener,
            &own,
            &[0; UNIQUE_ID_BYTES],
            Duration::from_secs(20),
        )
        .map_err(|e| e.to_string())
    });
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(greeting).unwrap();
    server.join().unwrap().unwrap_err()
}

#[test]
fn an_oversized_or_foreign_greeting_is_refused_before_allocating() {
    let mut hello = b"INVSPRD1".to_vec();
    for v in [1u32, 2, u32::MAX] {
        hello.extend_from_slice(&v.to_le_bytes());
    }
    let err = serve_against(&hello);
    assert!(
        err.contains("sent a 4294967295-byte configuration, at most 1048576 expected"),
        "{err}"
    );
    let err = serve_against(b"GET / HTTP/1.1\r\n\r\n");
    assert!(err.contains("not an invaspread rank"), "{err}");
}
