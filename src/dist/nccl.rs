//! The data-parallel group's collectives on the GPU: NCCL, opened at run time as libcuda is
//! (cudarc's `nccl` feature with dynamic loading, so nothing NCCL is needed to build), or on the
//! virtual GPU its stand-in (vgpu/nccl.cpp: the same calls between processes of one machine).
//!
//! A [`ProcessGroup`] is made by [`ProcessGroup::join`]: the TCP rendezvous
//! ([`super::rendezvous`]) checks every rank's configuration and hands out rank 0's NCCL unique
//! id, then every rank calls `ncclCommInitRank` on its device (`LOCAL_RANK`).
//!
//! Faults. A collective is queued on the device's stream and returns at once; a rank that died
//! or hangs would leave the others waiting in it forever. So every collective here ends with
//! [`ProcessGroup::wait`], a watchdog in the calling thread (PyTorch's is a thread of its own):
//! it polls an event recorded after the collective and NCCL's asynchronous error, and when the
//! error is set or the timeout passes it aborts the communicator (`ncclCommAbort`, which makes
//! the stuck collective return) and returns [`Error::Peer`] with NCCL's last error, which names
//! the rank where NCCL knows it (the stand-in always does: the rank that closed its connection,
//! or the one rank 0 is still waiting for). After that the group is unusable; the run stops.

use std::ffi::CStr;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use super::rendezvous::{self, Member, UNIQUE_ID_BYTES};
use super::DistEnv;
use crate::cuda::Gpu;
use crate::error::{Error, Result};

/// Whether NCCL (or, on the virtual GPU, its stand-in) can be opened; an error saying what to
/// install when not. Call after the GPU was chosen (that loads the virtual GPU's libraries).
pub fn require_nccl() -> Result<()> {
    // SAFETY: only tries to open the shared library; no symbol is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::NoDevice(
            "NCCL was not found, which training on several GPUs needs: cudarc opens \
             libnccl.so; install NCCL (for example `pip install nvidia-nccl-cu13`, which ships \
             lib/libnccl.so.2: link libnccl.so to it) and put its folder on LD_LIBRARY_PATH"
                .into(),
        ))
    }
}

fn error_string(code: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static C string for any code.
    let text = unsafe { sys::ncclGetErrorString(code) };
    if text.is_null() {
        format!("{code:?}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

fn last_error(comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetLastError takes a live communicator or null and returns a C string.
    let text = unsafe { sys::ncclGetLastError(comm) };
    if text.is_null() {
        String::new()
    } else {
        // SAFETY: non-null and NUL-terminated; copied before the next NCCL call.
        unsafe { CStr::from_ptr(text) }
            .to_string_lossy()
            .into_owned()
    }
}

fn check(code: sys::ncclResult_t, what: &str, comm: sys::ncclComm_t) -> Result<()> {
    if code == sys::ncclResult_t::ncclSuccess {
        return Ok(());
    }
    let detail = last_error(comm);
    Err(Error::Peer(format!(
        "{what}: {}{}",
        error_string(code),
        if detail.is_empty() {
            String::new()
        } else {
            format!(" ({detail})")
        }
    )))
}

/// Runs an NCCL entry point; cudarc panics when the library lacks the symbol.
fn guarded<T>(what: &str, call: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|_| {
        Error::Cuda(format!(
            "{what}: the NCCL library lacks this entry point (too old a version?)"
        ))
    })
}

/// A new unique id, made on rank 0 and handed to the others by the rendezvous.
pub fn unique_id() -> Result<[u8; UNIQUE_ID_BYTES]> {
    require_nccl()?;
    let mut id = sys::ncclUniqueId {
        internal: [0; UNIQUE_ID_BYTES],
    };
    // SAFETY: `id` is a valid out-pointer.
    let code = guarded("ncclGetUniqueId", || unsafe {
        sys::ncclGetUniqueId(&mut id)
    })?;
    check(code, "ncclGetUniqueId", std::ptr::null_mut())?;
    Ok(id.internal.map(|c| c as u8))
}

/// One rank's membership in a data-parallel group, with its NCCL communicator.
pub struct ProcessGroup {
    comm: sys::ncclComm_t,
    rank: usize,
    world_size: usize,
    stream: Arc<CudaStream>,
    timeout: Duration,
    /// Collectives issued so far, for messages.
    issued: u64,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time, which `&mut
// self` on every collective guarantees.
unsafe impl Send for ProcessGroup {}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .finish_non_exhaustive()
    }
}

impl ProcessGroup {
    /// Joins the group that `env` describes on `gpu` (the device `env.local_rank`): the
    /// rendezvous at `MASTER_ADDR:MASTER_PORT` checks that every rank sends the same `config`
    /// (canonical JSON), rank 0 hands out its NCCL unique id, and every rank makes its
    /// communicator. `timeout` bounds the rendezvous and, later, every collective.
    pub fn join(gpu: &Gpu, env: &DistEnv, config: Vec<u8>, timeout: Duration) -> Result<Self> {
        require_nccl()?;
        let own = Member {
            rank: env.rank,
            world_size: env.world_size,
            config,
        };
        let addr = format!("{}:{}", env.master_addr, env.master_port);
        let id = if env.rank == 0 {
            let listener = TcpListener::bind(&addr).map_err(|e| {
                Error::Peer(format!(
                    "rank 0 could not listen at MASTER_ADDR:MASTER_PORT {addr}: {e}"
                ))
            })?;
            let id = unique_id()?;
            rendezvous::serve(listener, &own, &id, timeout)?;
            id
        } else {
            rendezvous::join(&addr, &own, timeout)?
        };
        Self::from_unique_id(gpu, env.rank, env.world_size, &id, timeout)
    }

    /// Makes rank `rank`'s communicator of a group of `world_size` from rank 0's unique id.
    pub fn from_unique_id(
        gpu: &Gpu,
        rank: usize,
        world_size: usize,
        id: &[u8; UNIQUE_ID_BYTES],
        timeout: Duration,
    ) -> Result<Self> {
        require_nccl()?;
        if rank >= world_size {
            return Err(Error::invalid(format!(
                "rank {rank} of a group of {world_size}: expected a rank below the group size"
            )));
        }
        let to_c = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| Error::invalid(format!("{what} {v} exceeds NCCL's int")))
        };
        let (nranks, rank_c) = (to_c(world_size, "group size")?, to_c(rank, "rank")?);
        let unique = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        gpu.context()
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("binding the context for NCCL: {e}")))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is a valid out-pointer; the id is passed by value.
        let code = guarded("ncclCommInitRank", || unsafe {
            sys::ncclCommInitRank(&mut comm, nranks, unique, rank_c)
        })?;
        check(code, &format!("rank {rank}: ncclCommInitRank"), comm)?;
        Ok(ProcessGroup {
            comm,
            rank,
            world_size,
            stream: gpu.stream().clone(),
            timeout,
            issued: 0,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    fn len_check(&self, what: &str, send: usize, recv: usize, recv_expected: usize) -> Result<()> {
        if recv != recv_expected {
            return Err(Error::invalid(format!(
                "{what}: {send} elements sent, a receive buffer of {recv} where {recv_expected} \
                 were expected ({} ranks)",
                self.world_size
            )));
        }
        Ok(())
    }

    /// Concatenates every rank's `send` in rank order into `recv` (world size x `send`).
    pub fn all_gather(
        &mut self,
        send: &impl DevicePtr<f32>,
        recv: &mut impl DevicePtrMut<f32>,
        what: &str,
    ) -> Result<()> {
        self.len_check(what, send.len(), recv.len(), send.len() * self.world_size)?;
        let queue = self.stream.clone();
        let (s, _a) = send.device_ptr(&queue);
        let (r, _b) = recv.device_ptr_mut(&queue);
        let (comm, stream) = (self.comm, queue.cu_stream());
        self.run(what, || unsafe {
            // SAFETY: both buffers live on this device for the call and are long enough.
            sys::ncclAllGather(
                s as *const _,
                r as *mut _,
                send.len(),
                sys::ncclDataType_t::ncclFloat32,
                comm,
                stream as _,
            )
        })
    }

    /// `buf` becomes the sum over every rank's `buf`.
    pub fn all_reduce_sum(&mut self, buf: &mut impl DevicePtrMut<f32>, what: &str) -> Result<()> {
        let queue = self.stream.clone();
        self.queue_all_reduce_sum(&queue, buf, what)?;
        self.wait(what)
    }

    /// Queues "`buf` becomes the sum over every rank's `buf`" on `stream` and returns at once,
    /// without the watchdog: the caller orders `stream` after the work that writes `buf` and
    /// later calls [`ProcessGroup::wait_on`] for `stream` (the data-parallel gradient buckets,
    /// summed while the backward pass goes on). NCCL runs a communicator's collectives in the
    /// order they were queued, whatever their streams, so every rank must queue the same ones
    /// in the same order.
    pub fn queue_all_reduce_sum(
        &mut self,
        stream: &Arc<CudaStream>,
        buf: &mut impl DevicePtrMut<f32>,
        what: &str,
    ) -> Result<()> {
        let n = buf.len();
        let (p, _a) = buf.device_ptr_mut(stream);
        let (comm, cu_stream) = (self.comm, stream.cu_stream());
        self.queue(what, || unsafe {
            // SAFETY: in place, allowed by NCCL; the buffer lives for the call.
            sys::ncclAllReduce(
                p as *const _,
                p as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                cu_stream as _,
            )
        })
    }

    /// Sums `send` (world size x `recv`) over the ranks; rank r gets block r of the sum.
    pub fn reduce_scatter_sum(
        &mut self,
        send: &impl DevicePtr<f32>,
        recv: &mut impl DevicePtrMut<f32>,
        what: &str,
    ) -> Result<()> {
        if send.len() != recv.len() * self.world_size {
            return Err(Error::invalid(format!(
                "{what}: a send buffer of {} elements for a receive buffer of {} over {} ranks",
                send.len(),
                recv.len(),
                self.world_size
            )));
        }
        let queue = self.stream.clone();
        let (s, _a) = send.device_ptr(&queue);
        let n = recv.len();
        let (r, _b) = recv.device_ptr_mut(&queue);
        let (comm, stream) = (self.comm, queue.cu_stream());
        self.run(what, || unsafe {
            // SAFETY: both buffers live for the call and have the checked lengths.
            sys::ncclReduceScatter(
                s as *const _,
                r as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                comm,
                stream as _,
            )
        })
    }

    /// Every rank's `buf` becomes rank `root`'s.
    pub fn broadcast(
        &mut self,
        buf: &mut impl DevicePtrMut<f32>,
        root: usize,
        what: &str,
    ) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::invalid(format!(
                "{what}: root {root} of a group of {}",
                self.world_size
            )));
        }
        let queue = self.stream.clone();
        let n = buf.len();
        let (p, _a) = buf.device_ptr_mut(&queue);
        let (comm, stream) = (self.comm, queue.cu_stream());
        self.run(what, || unsafe {
            // SAFETY: in place, allowed by NCCL; root is below the group size.
            sys::ncclBroadcast(
                p as *const _,
                p as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                comm,
                stream as _,
            )
        })
    }

    /// Queues one collective and waits for it under the watchdog.
    fn run(&mut self, what: &str, call: impl FnOnce() -> sys::ncclResult_t) -> Result<()> {
        self.queue(what, call)?;
        self.wait(what)
    }

    /// An error unless the communicator is usable (an earlier failure aborts it).
    fn live(&self, what: &str) -> Result<()> {
        if self.comm.is_null() {
            return Err(Error::Peer(format!(
                "rank {}: {what}: the group was aborted by an earlier failure",
                self.rank
            )));
        }
        Ok(())
    }

    /// Queues one collective (its stream is in `call`).
    fn queue(&mut self, what: &str, call: impl FnOnce() -> sys::ncclResult_t) -> Result<()> {
        self.live(what)?;
        self.issued += 1;
        let code = guarded(what, call)?;
        check(code, &format!("rank {}: {what}", self.rank), self.comm)
    }

    /// Waits until the device's stream has run everything queued so far, the last collective
    /// included; aborts the group and names the reason when NCCL reports an error or `timeout`
    /// passes.
    pub fn wait(&mut self, what: &str) -> Result<()> {
        let stream = self.stream.clone();
        self.wait_on(&stream, what)
    }

    /// [`ProcessGroup::wait`] for another stream of the device (one that collectives were
    /// queued on with [`ProcessGroup::queue_all_reduce_sum`]).
    pub fn wait_on(&mut self, stream: &CudaStream, what: &str) -> Result<()> {
        self.live(what)?;
        let event = stream
            .record_event(None)
            .map_err(|e| Error::Cuda(format!("recording an event after {what}: {e}")))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            let mut state = sys::ncclResult_t::ncclSuccess;
            // SAFETY: a live communicator and a valid out-pointer.
            let code = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
            if code != sys::ncclResult_t::ncclSuccess {
                state = code;
            }
            if state != sys::ncclResult_t::ncclSuccess {
                let why = format!("{}: {}", error_string(state), last_error(self.comm));
                return Err(self.abort(what, &why));
            }
            let done = event
                .try_is_complete()
                .map_err(|e| Error::Cuda(format!("waiting for {what}: {e}")))?;
            if done {
                return Ok(());
            }
            if start.elapsed() >= self.timeout {
                let why = format!(
                    "it did not finish within {:.0} s: a rank died or hangs ({})",
                    self.timeout.as_secs_f64(),
                    last_error(self.comm)
                );
                return Err(self.abort(what, &why));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Aborts the communicator (the stuck collective returns) and forms the error.
    fn abort(&mut self, what: &str, why: &str) -> Error {
        // SAFETY: a live communicator; it is not used again (comm becomes null).
        let _ = unsafe { sys::ncclCommAbort(self.comm) };
        self.comm = std::ptr::null_mut();
        Error::Peer(format!(
            "rank {} of {}: collective {} ({what}) failed: {why}",
            self.rank, self.world_size, self.issued
        ))
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: a live communicator, not used after this.
            let _ = unsafe { sys::ncclCommDestroy(self.comm) };
        }
    }
}
