//! The start-up rendezvous of a data-parallel group over TCP at `MASTER_ADDR:MASTER_PORT`.
//!
//! Rank 0 listens; every other rank connects (retrying until the timeout, since rank 0 may start
//! later), says which rank it is, the group size it was told and its run configuration. Rank 0
//! checks that each expected rank comes once, with its own group size and configuration, then
//! answers every rank with the group's unique id (NCCL's 128-byte `ncclUniqueId`), or, on any
//! mismatch, answers every connected rank with the reason. A rank missing at the timeout, a
//! duplicate, another group size or another configuration is an error on rank 0 naming the rank
//! (and the configuration fields that differ), so a misconfigured group stops at start instead
//! of training on different settings or hanging in its first collective.
//!
//! Wire format, little-endian. Hello: the magic `INVSPRD1`, rank u32, world size u32, config
//! length u32 (at most [`MAX_CONFIG_BYTES`], checked before anything is allocated), config
//! bytes. Reply: tag u8, then for 1 (welcome) the [`UNIQUE_ID_BYTES`] id, for 2 (refused) a
//! length u32 (at most [`MAX_REASON_BYTES`]) and the reason in UTF-8.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The size of NCCL's unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;
/// The largest configuration a rank may send (a run's config.json is a few KB).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// The longest refusal rank 0 sends.
pub const MAX_REASON_BYTES: usize = 4096;

const MAGIC: &[u8; 8] = b"INVSPRD1";
const WELCOME: u8 = 1;
const REFUSED: u8 = 2;

/// What a rank brings to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub rank: usize,
    pub world_size: usize,
    /// The run's configuration as canonical JSON (every rank must send the same bytes).
    pub config: Vec<u8>,
}

/// Rank 0's side: waits on `listener` for ranks 1 .. world_size - 1 until `timeout`, checks
/// them against `own`, and sends each the unique id `id`. An error names the rank at fault.
pub fn serve(
    listener: TcpListener,
    own: &Member,
    id: &[u8; UNIQUE_ID_BYTES],
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let n = own.world_size;
    let mut joined: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(net("listening"))?;
    let outcome = (|| -> Result<()> {
        while joined.iter().skip(1).any(Option::is_none) {
            let (mut stream, peer) = match listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<usize> = (1..n).filter(|&r| joined[r].is_none()).collect();
                        return Err(Error::invalid(format!(
                            "rendezvous: rank(s) {missing:?} of {n} did not join rank 0 within \
                             {} s (are they started, with MASTER_ADDR and MASTER_PORT pointing \
                             here?)",
                            timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Err(e) => return Err(net("accepting a rank")(e)),
            };
            stream
                .set_nonblocking(false)
                .map_err(net("a rank's connection"))?;
            stream
                .set_read_timeout(Some(remaining(deadline)))
                .map_err(net("a rank's connection"))?;
            let hello = read_hello(&mut stream).map_err(|e| {
                Error::invalid(format!("rendezvous: a connection from {peer}: {e}"))
            })?;
            if let Err(reason) = check_member(own, &hello, &joined) {
                let _ = send_refusal(&mut stream, &reason);
                return Err(Error::invalid(format!("rendezvous: {reason}")));
            }
            joined[hello.rank] = Some(stream);
        }
        Ok(())
    })();
    for stream in joined.iter_mut().flatten() {
        match &outcome {
            Ok(()) => {
                let mut reply = vec![WELCOME];
                reply.extend_from_slice(id);
                stream
                    .write_all(&reply)
                    .map_err(net("sending the unique id"))?;
            }
            // The others learn why the group stopped (best effort: they may be gone).
            Err(e) => {
                let _ = send_refusal(stream, &e.to_string());
            }
        }
    }
    outcome
}

/// A rank's side: joins rank 0 at `addr` (host:port) within `timeout` and returns the unique id,
/// or rank 0's reason for refusing.
pub fn join(addr: &str, own: &Member, timeout: Duration) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        let attempt = addr
            .to_socket_addrs()
            .map_err(|e| {
                Error::invalid(format!("rendezvous: MASTER_ADDR:MASTER_PORT {addr}: {e}"))
            })?
            .find_map(|a| TcpStream::connect_timeout(&a, remaining(deadline)).ok());
        match attempt {
            Some(stream) => break stream,
            None if Instant::now() >= deadline => {
                return Err(Error::invalid(format!(
                    "rendezvous: rank {} could not reach rank 0 at {addr} within {} s",
                    own.rank,
                    timeout.as_secs_f64()
                )))
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    // Rank 0 answers once the last rank joins, up to its own timeout counted from its own
    // start, which may be later than ours: wait that long again (and a little) for the answer.
    stream
        .set_read_timeout(Some(timeout + Duration::from_secs(2)))
        .map_err(net("the connection to rank 0"))?;
    let config_len = u32::try_from(own.config.len())
        .ok()
        .filter(|&l| l as usize <= MAX_CONFIG_BYTES)
        .ok_or_else(|| Error::invalid("rendezvous: the configuration is over 1 MiB"))?;
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&u32_of(own.rank)?.to_le_bytes());
    hello.extend_from_slice(&u32_of(own.world_size)?.to_le_bytes());
    hello.extend_from_slice(&config_len.to_le_bytes());
    hello.extend_from_slice(&own.config);
    stream.write_all(&hello).map_err(net("greeting rank 0"))?;
    let fail = |e: std::io::Error| {
        Error::invalid(format!(
            "rendezvous: rank {} got no answer from rank 0 at {addr}: {e}",
            own.rank
        ))
    };
    let mut tag = [0u8];
    stream.read_exact(&mut tag).map_err(fail)?;
    match tag[0] {
        WELCOME => {
            let mut id = [0u8; UNIQUE_ID_BYTES];
            stream.read_exact(&mut id).map_err(fail)?;
            Ok(id)
        }
        REFUSED => {
            let len = read_u32(&mut stream).map_err(fail)? as usize;
            if len > MAX_REASON_BYTES {
                return Err(Error::invalid(format!(
                    "rendezvous: rank 0 refused rank {} with a {len}-byte reason (at most \
                     {MAX_REASON_BYTES})",
                    own.rank
                )));
            }
            let mut reason = vec![0u8; len];
            stream.read_exact(&mut reason).map_err(fail)?;
            Err(Error::invalid(format!(
                "rendezvous: rank 0 refused rank {}: {}",
                own.rank,
                String::from_utf8_lossy(&reason)
            )))
        }
        other => Err(Error::invalid(format!(
            "rendezvous: rank 0 at {addr} answered with tag {other}, expected 1 or 2 (is it an \
             invaspread rank 0 of this version?)"
        ))),
    }
}

/// Why `hello` cannot join the group of `own`, if it cannot.
fn check_member(
    own: &Member,
    hello: &Member,
    joined: &[Option<TcpStream>],
) -> std::result::Result<(), String> {
    let n = own.world_size;
    if hello.world_size != n {
        return Err(format!(
            "rank {} was started with WORLD_SIZE={}, rank 0 with WORLD_SIZE={n}",
            hello.rank, hello.world_size
        ));
    }
    if hello.rank == 0 || hello.rank >= n {
        return Err(format!(
            "a process says it is rank {}: expected 1 to {} (rank 0 is this one)",
            hello.rank,
            n - 1
        ));
    }
    if joined[hello.rank].is_some() {
        return Err(format!("rank {} joined twice", hello.rank));
    }
    if hello.config != own.config {
        return Err(format!(
            "rank {}'s configuration differs from rank 0's: {}",
            hello.rank,
            config_difference(&own.config, &hello.config)
        ));
    }
    Ok(())
}

/// The top-level fields of two JSON configurations that differ, as `field: ours vs theirs`.
fn config_difference(ours: &[u8], theirs: &[u8]) -> String {
    use serde_json::Value;
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Map<String, Value>>(b).ok();
    let (Some(a), Some(b)) = (parse(ours), parse(theirs)) else {
        return "the bytes differ (not both JSON objects)".into();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let shown = |v: Option<&Value>| v.map_or("(absent)".to_string(), Value::to_string);
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k} {} vs {}", shown(a.get(k)), shown(b.get(k))))
        .collect();
    match diffs.len() {
        0 => "the same fields, spelled differently".into(),
        1..=5 => diffs.join(", "),
        more => format!("{} and {} more fields", diffs[..5].join(", "), more - 5),
    }
}

fn read_hello(stream: &mut TcpStream) -> std::result::Result<Member, String> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).map_err(|e| e.to_string())?;
    if &magic != MAGIC {
        return Err("not an invaspread rank (wrong greeting)".into());
    }
    let rank = read_u32(stream).map_err(|e| e.to_string())? as usize;
    let world_size = read_u32(stream).map_err(|e| e.to_string())? as usize;
    let len = read_u32(stream).map_err(|e| e.to_string())? as usize;
    if len > MAX_CONFIG_BYTES {
        return Err(format!(
            "rank {rank} sent a {len}-byte configuration, at most {MAX_CONFIG_BYTES} expected"
        ));
    }
    let mut config = vec![0u8; len];
    stream.read_exact(&mut config).map_err(|e| e.to_string())?;
    Ok(Member {
        rank,
        world_size,
        config,
    })
}

fn send_refusal(stream: &mut TcpStream, reason: &str) -> std::io::Result<()> {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut reply = vec![REFUSED];
    reply.extend_from_slice(&(end as u32).to_le_bytes());
    reply.extend_from_slice(&reason.as_bytes()[..end]);
    stream.write_all(&reply)
}

fn read_u32(stream: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    stream.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn u32_of(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::invalid(format!("rendezvous: {x} is over u32")))
}

/// A network error during `what`, as the crate's error.
fn net(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::invalid(format!("rendezvous: {what}: {e}"))
}

/// The time left until `deadline`, at least a millisecond (a zero timeout means "none").
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}
