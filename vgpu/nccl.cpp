// libnccl.so for the virtual GPU: the collectives this crate calls (ncclAllReduce, ncclAllGather,
// ncclReduceScatter, ncclBroadcast), between processes of one machine, each on its own virtual
// GPU. cudarc opens "libnccl.so" as it opens libcuda; src/cuda/virtual_gpu.rs loads this file
// first by absolute path, so that name resolves to it (its SONAME).
//
// Transport: a star of Unix-domain stream sockets in the abstract namespace (no files to clean
// up). ncclGetUniqueId, called by rank 0 as with NCCL, opens the listening socket and writes its
// name into the id; ncclCommInitRank on rank 0 accepts the other nranks - 1 ranks, which connect
// to that name. Every collective is queued on its stream through the driver (vgpu_enqueue), so
// it runs in stream order after the kernels that produce its input, as on a GPU, and, as NCCL's,
// after every collective queued before it on the communicator (on any stream). There, every
// rank but 0 sends its header and input to rank 0; rank 0 checks that every rank called the same
// collective (kind, sequence number, count, type, operation, root: a mismatch is an error naming
// both ranks, where NCCL would hang or corrupt), computes the result in rank order and sends each
// rank its part.
//
// Faults behave as NCCL's do for the caller: a peer that dies (its socket closes) or sends a
// wrong header sets the communicator's asynchronous error (ncclCommGetAsyncError says
// ncclRemoteError, ncclGetLastError the reason, naming the rank), and rank 0 forwards the reason
// to the other ranks so that they stop too; a peer that hangs leaves the collective waiting until
// the caller's watchdog calls ncclCommAbort (which shuts the sockets down, so the waiting stream
// operation returns). While a collective waits, ncclGetLastError says for which rank, so the
// watchdog can name it. After an error every later collective of the communicator does nothing.
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_types.h"

extern "C" int vgpu_check_range(CUdeviceptr addr, std::size_t bytes, char* why, std::size_t len);
extern "C" void vgpu_enqueue(CUstream stream, void (*run)(void*), void* closure);

namespace {

enum Result : int {
    ncclSuccess = 0,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
};
enum DataType : int {
    ncclInt8 = 0, ncclUint8 = 1, ncclInt32 = 2, ncclUint32 = 3, ncclInt64 = 4,
    ncclUint64 = 5, ncclFloat16 = 6, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9,
};
enum RedOp : int { ncclSum = 0, ncclProd = 1, ncclMax = 2, ncclMin = 3, ncclAvg = 4 };
enum Kind : std::uint32_t {
    kHello = 1, kAllReduce, kAllGather, kReduceScatter, kBroadcast, kAbort = 99,
};

constexpr std::uint32_t kMagic = 0x4c43434e;  // "NCCL"
constexpr char kIdPrefix[] = "invaspread-vnccl:";
constexpr std::size_t kIdBytes = 128;

struct Header {
    std::uint32_t magic = kMagic;
    std::uint32_t kind = 0;
    std::uint64_t seq = 0;
    std::uint64_t count = 0;  // elements (kAbort: bytes of the message that follows)
    std::int32_t type = 0, op = 0, root = 0, rank = 0, nranks = 0;
};

const char* kind_name(std::uint32_t k) {
    switch (k) {
        case kAllReduce: return "ncclAllReduce";
        case kAllGather: return "ncclAllGather";
        case kReduceScatter: return "ncclReduceScatter";
        case kBroadcast: return "ncclBroadcast";
        case kHello: return "ncclCommInitRank";
        default: return "an unknown call";
    }
}

std::size_t type_size(int t) {
    switch (t) {
        case ncclInt8: case ncclUint8: return 1;
        case ncclFloat16: case ncclBfloat16: return 2;
        case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
        case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
        default: return 0;
    }
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

double init_timeout_s() {
    const char* v = std::getenv("INVASPREAD_NCCL_INIT_TIMEOUT_S");
    const double t = v && *v ? std::atof(v) : 120.0;
    return t > 0 ? t : 120.0;
}

// The error of the last call that failed before a communicator existed.
std::mutex global_lock;
std::string global_error;
// Listening sockets made by ncclGetUniqueId in this process, by their name.
std::map<std::string, int> listeners;

Result global_fail(Result code, std::string message) {
    std::lock_guard<std::mutex> g(global_lock);
    global_error = "virtual NCCL: " + message;
    return code;
}

sockaddr_un address_of(const std::string& name, socklen_t* len) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    a.sun_path[0] = '\0';  // the abstract namespace
    std::memcpy(a.sun_path + 1, name.data(), name.size());
    *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    return a;
}

bool send_all(int fd, const void* data, std::size_t bytes) {
    auto* p = static_cast<const char*>(data);
    while (bytes) {
        const ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
        if (n <= 0) return false;
        p += n;
        bytes -= static_cast<std::size_t>(n);
    }
    return true;
}

bool recv_all(int fd, void* data, std::size_t bytes) {
    auto* p = static_cast<char*>(data);
    while (bytes) {
        const ssize_t n = ::recv(fd, p, bytes, 0);
        if (n <= 0) return false;
        p += n;
        bytes -= static_cast<std::size_t>(n);
    }
    return true;
}

struct Comm {
    int rank = 0, nranks = 0, device = 0;
    // Rank 0: the socket of every other rank (peers[0] = -1); other ranks: peers[0], rank 0's.
    std::vector<int> peers;
    std::uint64_t next_seq = 0;  // collectives queued so far (host side)
    // The collective whose turn it is. NCCL runs a communicator's collectives one at a time in
    // the order they were queued, whichever streams they were queued on; so does this.
    std::uint64_t turn = 0;
    std::mutex turn_lock;
    std::condition_variable turn_changed;
    std::atomic<int> async_error{ncclSuccess};
    std::atomic<bool> aborted{false};
    std::mutex text_lock;
    std::string error, waiting;

    ~Comm() {
        for (int fd : peers)
            if (fd >= 0) ::close(fd);
    }

    void fail(Result code, const std::string& message) {
        std::lock_guard<std::mutex> g(text_lock);
        int expected = ncclSuccess;
        if (async_error.compare_exchange_strong(expected, code))
            error = format("virtual NCCL, rank %d: %s", rank, message.c_str());
        wake_all();
    }
    // Blocks until collective `seq` may run: every one queued before it has finished (or the
    // communicator failed; then the caller does nothing).
    void wait_turn(std::uint64_t seq) {
        std::unique_lock<std::mutex> g(turn_lock);
        turn_changed.wait(g, [&] { return turn == seq || aborted.load() || async_error.load() != ncclSuccess; });
    }
    void end_turn(std::uint64_t seq) {
        {
            std::lock_guard<std::mutex> g(turn_lock);
            if (turn == seq) turn = seq + 1;
        }
        turn_changed.notify_all();
    }
    // Wakes every collective waiting for its turn (after an error or an abort).
    void wake_all() {
        { std::lock_guard<std::mutex> g(turn_lock); }
        turn_changed.notify_all();
    }
    void wait_note(const std::string& what) {
        std::lock_guard<std::mutex> g(text_lock);
        waiting = what;
    }
    std::string last_error() {
        std::lock_guard<std::mutex> g(text_lock);
        if (!error.empty()) return error;
        if (!waiting.empty()) return format("virtual NCCL, rank %d: %s", rank, waiting.c_str());
        return "";
    }
};

// What ncclComm_t points to: the stream operations queued on the communicator hold the Comm too,
// so that ncclCommDestroy or ncclCommAbort never frees it under one of them.
struct Handle {
    std::shared_ptr<Comm> comm;
};

// ---- the collectives -------------------------------------------------------------------------

struct Collective {
    std::shared_ptr<Comm> comm;
    Header header;
    const void* send = nullptr;
    void* recv = nullptr;
    std::size_t send_bytes = 0, recv_bytes = 0;
};

template <class T>
void reduce_into(T* acc, const T* x, std::size_t n, int op) {
    for (std::size_t i = 0; i < n; ++i) {
        switch (op) {
            case ncclSum: case ncclAvg: acc[i] = acc[i] + x[i]; break;
            case ncclProd: acc[i] = acc[i] * x[i]; break;
            case ncclMax: acc[i] = x[i] > acc[i] ? x[i] : acc[i]; break;
            case ncclMin: acc[i] = x[i] < acc[i] ? x[i] : acc[i]; break;
        }
    }
}

template <class T>
void divide(T* acc, std::size_t n, int by) {
    for (std::size_t i = 0; i < n; ++i) acc[i] = acc[i] / static_cast<T>(by);
}

// acc op= x over `n` elements of the collective's type (checked when it was queued).
void reduce_bytes(std::vector<char>& acc, const std::vector<char>& x, int type, int op) {
    const std::size_t n = acc.size() / type_size(type);
    switch (type) {
        case ncclInt8: reduce_into((std::int8_t*)acc.data(), (const std::int8_t*)x.data(), n, op); break;
        case ncclUint8: reduce_into((std::uint8_t*)acc.data(), (const std::uint8_t*)x.data(), n, op); break;
        case ncclInt32: reduce_into((std::int32_t*)acc.data(), (const std::int32_t*)x.data(), n, op); break;
        case ncclUint32: reduce_into((std::uint32_t*)acc.data(), (const std::uint32_t*)x.data(), n, op); break;
        case ncclInt64: reduce_into((std::int64_t*)acc.data(), (const std::int64_t*)x.data(), n, op); break;
        case ncclUint64: reduce_into((std::uint64_t*)acc.data(), (const std::uint64_t*)x.data(), n, op); break;
        case ncclFloat32: reduce_into((float*)acc.data(), (const float*)x.data(), n, op); break;
        case ncclFloat64: reduce_into((double*)acc.data(), (const double*)x.data(), n, op); break;
    }
}

void average(std::vector<char>& acc, int type, int nranks) {
    const std::size_t n = acc.size() / type_size(type);
    switch (type) {
        case ncclInt32: divide((std::int32_t*)acc.data(), n, nranks); break;
        case ncclUint32: divide((std::uint32_t*)acc.data(), n, nranks); break;
        case ncclInt64: divide((std::int64_t*)acc.data(), n, nranks); break;
        case ncclUint64: divide((std::uint64_t*)acc.data(), n, nranks); break;
        case ncclFloat32: divide((float*)acc.data(), n, nranks); break;
        case ncclFloat64: divide((double*)acc.data(), n, nranks); break;
        default: divide((std::int8_t*)acc.data(), n, nranks); break;
    }
}

const char* type_name(int t) {
    static const char* names[] = {"int8", "uint8", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64", "bfloat16"};
    return t >= 0 && t < 10 ? names[t] : "an unknown type";
}

std::string describe(const Header& h) {
    static const char* ops[] = {"sum", "prod", "max", "min", "avg"};
    std::string text = format("%s #%llu of %llu %s", kind_name(h.kind), (unsigned long long)h.seq,
                              (unsigned long long)h.count, type_name(h.type));
    if (h.kind == kAllReduce || h.kind == kReduceScatter) text += format(", %s", h.op >= 0 && h.op < 5 ? ops[h.op] : "?");
    if (h.kind == kBroadcast) text += format(", root %d", h.root);
    return text;
}

bool same_call(const Header& a, const Header& b) {
    return a.kind == b.kind && a.seq == b.seq && a.count == b.count && a.type == b.type &&
           a.op == b.op && a.root == b.root;
}

// Whether rank `k` sends an input to rank 0 for this collective.
bool sends_input(const Header& h, int k) { return h.kind != kBroadcast || h.root == k; }

// The bytes of one rank's input.
std::size_t input_bytes(const Header& h) {
    const std::size_t n = h.count * type_size(h.type);
    return h.kind == kReduceScatter ? n * static_cast<std::size_t>(h.nranks) : n;
}

// Rank 0 tells every other rank why the communicator stopped (best effort: some are gone).
void broadcast_abort(Comm& c, const std::string& why) {
    Header h;
    h.kind = kAbort;
    h.count = why.size();
    for (int k = 1; k < c.nranks; ++k) {
        if (c.peers[k] < 0) continue;
        if (send_all(c.peers[k], &h, sizeof h)) send_all(c.peers[k], why.data(), why.size());
    }
}

// Rank 0's part: gathers every rank's input, forms the result, returns each rank its part.
void run_hub(Comm& c, const Collective& job, std::vector<char> own) {
    const Header& h = job.header;
    const std::size_t elem = type_size(h.type);
    std::vector<std::vector<char>> inputs(c.nranks);
    inputs[0] = std::move(own);
    for (int k = 1; k < c.nranks; ++k) {
        c.wait_note(format("rank 0 is waiting for rank %d's part of %s", k, describe(h).c_str()));
        Header got;
        if (!recv_all(c.peers[k], &got, sizeof got) || got.magic != kMagic) {
            const std::string why = c.aborted ? format("aborted while waiting for rank %d in %s", k, describe(h).c_str())
                                              : format("rank %d closed its connection (its process ended) before %s", k, describe(h).c_str());
            c.fail(ncclRemoteError, why);
            broadcast_abort(c, why);
            return;
        }
        if (!same_call(got, h)) {
            const std::string why = format("rank %d called %s where rank 0 called %s", k, describe(got).c_str(), describe(h).c_str());
            c.fail(ncclInvalidUsage, why);
            broadcast_abort(c, why);
            return;
        }
        if (sends_input(h, k)) {
            inputs[k].resize(input_bytes(h));
            if (!recv_all(c.peers[k], inputs[k].data(), inputs[k].size())) {
                const std::string why = format("rank %d closed its connection in %s", k, describe(h).c_str());
                c.fail(ncclRemoteError, why);
                broadcast_abort(c, why);
                return;
            }
        }
    }
    c.wait_note("");
    // The result every rank gets (all-gather, all-reduce, broadcast) or the sum it is cut from.
    std::vector<char> result;
    if (h.kind == kAllGather) {
        for (auto& in : inputs) result.insert(result.end(), in.begin(), in.end());
    } else if (h.kind == kBroadcast) {
        result = std::move(inputs[h.root]);
    } else {
        result = std::move(inputs[0]);
        for (int k = 1; k < c.nranks; ++k) reduce_bytes(result, inputs[k], h.type, h.op);
        if (h.op == ncclAvg) average(result, h.type, c.nranks);
    }
    const std::size_t part = h.kind == kReduceScatter ? h.count * elem : result.size();
    for (int k = 1; k < c.nranks; ++k) {
        Header reply = h;
        const char* from = result.data() + (h.kind == kReduceScatter ? k * part : 0);
        if (!send_all(c.peers[k], &reply, sizeof reply) || !send_all(c.peers[k], from, part)) {
            const std::string why = format("rank %d closed its connection in %s", k, describe(h).c_str());
            c.fail(ncclRemoteError, why);
            broadcast_abort(c, why);
            return;
        }
    }
    if (job.recv_bytes) std::memcpy(job.recv, result.data(), job.recv_bytes);
}

// Every other rank's part: its input to rank 0, the result back.
void run_leaf(Comm& c, const Collective& job, const std::vector<char>& own) {
    const Header& h = job.header;
    const int hub = c.peers[0];
    if (!send_all(hub, &h, sizeof h) || (sends_input(h, c.rank) && !send_all(hub, own.data(), own.size()))) {
        c.fail(ncclRemoteError, format("rank 0 closed its connection (its process ended) before %s", describe(h).c_str()));
        return;
    }
    c.wait_note(format("rank %d is waiting for rank 0's result of %s", c.rank, describe(h).c_str()));
    Header got;
    if (!recv_all(hub, &got, sizeof got) || got.magic != kMagic) {
        c.fail(ncclRemoteError, c.aborted ? format("aborted while waiting for rank 0 in %s", describe(h).c_str())
                                          : format("rank 0 closed its connection (its process ended) in %s", describe(h).c_str()));
        return;
    }
    if (got.kind == kAbort) {
        std::string why(std::min<std::uint64_t>(got.count, 4096), '\0');
        if (!recv_all(hub, why.data(), why.size())) why = "(the reason was cut off)";
        c.fail(ncclRemoteError, "rank 0 stopped the communicator: " + why);
        return;
    }
    std::vector<char> result(job.recv_bytes);
    if (!same_call(got, h) || !recv_all(hub, result.data(), result.size())) {
        c.fail(ncclRemoteError, format("rank 0's reply to %s was %s", describe(h).c_str(), describe(got).c_str()));
        return;
    }
    c.wait_note("");
    std::memcpy(job.recv, result.data(), result.size());
}

void run_collective(void* closure) {
    std::unique_ptr<Collective> job(static_cast<Collective*>(closure));
    Comm& c = *job->comm;
    const std::uint64_t seq = job->header.seq;
    c.wait_turn(seq);
    struct EndTurn {
        Comm& c;
        std::uint64_t seq;
        ~EndTurn() { c.end_turn(seq); }
    } end_turn{c, seq};
    if (c.async_error.load() != ncclSuccess || c.aborted) return;
    char why[512] = {};
    if ((job->send_bytes && !vgpu_check_range(reinterpret_cast<CUdeviceptr>(job->send), job->send_bytes, why, sizeof why)) ||
        (job->recv_bytes && !vgpu_check_range(reinterpret_cast<CUdeviceptr>(job->recv), job->recv_bytes, why, sizeof why))) {
        c.fail(ncclInvalidArgument, format("memcheck: %s ran after a buffer was freed: %s", describe(job->header).c_str(), why));
        if (c.rank == 0) broadcast_abort(c, c.last_error());
        return;
    }
    // The input is copied first: in-place calls (send inside recv) are allowed.
    std::vector<char> own;
    if (sends_input(job->header, c.rank)) {
        const char* p = static_cast<const char*>(job->send);
        own.assign(p, p + job->send_bytes);
    }
    if (c.rank == 0) run_hub(c, *job, std::move(own));
    else run_leaf(c, *job, own);
}

Result queue(Handle* handle, Kind kind, const void* send, void* recv, std::size_t count, int type, int op,
             int root, CUstream stream) {
    if (!handle) return global_fail(ncclInvalidArgument, format("%s: a null communicator", kind_name(kind)));
    Comm& c = *handle->comm;
    const std::size_t elem = type_size(type);
    if (elem == 0) return global_fail(ncclInvalidArgument, format("%s: unknown data type %d", kind_name(kind), type));
    const bool reduces = kind == kAllReduce || kind == kReduceScatter;
    if (reduces && (op < ncclSum || op > ncclAvg || type == ncclFloat16 || type == ncclBfloat16))
        return global_fail(ncclInvalidArgument,
                           format("%s: operation %d on type %d is not in the virtual NCCL (sum, prod, max, min, avg on "
                                  "8/32/64-bit integers, float32, float64)", kind_name(kind), op, type));
    if (kind == kBroadcast && (root < 0 || root >= c.nranks))
        return global_fail(ncclInvalidArgument, format("ncclBroadcast: root %d of %d ranks", root, c.nranks));
    auto job = std::make_unique<Collective>();
    job->comm = handle->comm;
    job->header.kind = kind;
    job->header.count = count;
    job->header.type = type;
    job->header.op = reduces ? op : 0;
    job->header.root = kind == kBroadcast ? root : 0;
    job->header.rank = c.rank;
    job->header.nranks = c.nranks;
    const std::size_t n = count * elem, r = static_cast<std::size_t>(c.nranks);
    job->send = send;
    job->recv = recv;
    switch (kind) {
        case kAllReduce: job->send_bytes = n; job->recv_bytes = n; break;
        case kAllGather: job->send_bytes = n; job->recv_bytes = n * r; break;
        case kReduceScatter: job->send_bytes = n * r; job->recv_bytes = n; break;
        default: job->send_bytes = c.rank == root ? n : 0; job->recv_bytes = n; break;
    }
    char why[512] = {};
    for (auto [p, bytes, name] : {std::tuple{send, job->send_bytes, "send"}, std::tuple{(const void*)recv, job->recv_bytes, "recv"}}) {
        if (bytes && !vgpu_check_range(reinterpret_cast<CUdeviceptr>(p), bytes, why, sizeof why))
            return global_fail(ncclInvalidArgument, format("memcheck: %s's %s buffer of %zu bytes: %s", kind_name(kind), name, bytes, why));
    }
    job->header.seq = c.next_seq++;  // only a queued collective takes a turn
    vgpu_enqueue(stream, run_collective, job.release());
    return ncclSuccess;
}

}  // namespace

// ---- the API ---------------------------------------------------------------------------------

extern "C" {

typedef struct {
    char internal[kIdBytes];
} ncclUniqueId;

const char* ncclGetErrorString(int code) {
    switch (code) {
        case ncclSuccess: return "no error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

const char* ncclGetLastError(Handle* comm) {
    thread_local std::string text;
    if (comm) text = comm->comm->last_error();
    if (!comm || text.empty()) {
        std::lock_guard<std::mutex> g(global_lock);
        text = global_error;
    }
    return text.c_str();
}

int ncclGetVersion(int* version) {
    if (!version) return ncclInvalidArgument;
    *version = 22800;  // reports itself as NCCL 2.28
    return ncclSuccess;
}

int ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return global_fail(ncclInvalidArgument, "ncclGetUniqueId: a null id");
    std::random_device entropy;
    const std::string name = format("%s%d-%08x%08x", kIdPrefix, (int)getpid(), entropy(), entropy());
    const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    socklen_t len;
    const sockaddr_un addr = address_of(name, &len);
    if (fd < 0 || ::bind(fd, reinterpret_cast<const sockaddr*>(&addr), len) != 0 || ::listen(fd, 128) != 0) {
        const int e = errno;
        if (fd >= 0) ::close(fd);
        return global_fail(ncclSystemError, format("ncclGetUniqueId: listening on %s: %s", name.c_str(), std::strerror(e)));
    }
    {
        std::lock_guard<std::mutex> g(global_lock);
        listeners[name] = fd;
    }
    std::memset(id->internal, 0, kIdBytes);
    std::memcpy(id->internal, name.data(), name.size());
    return ncclSuccess;
}

int ncclCommInitRank(Handle** out, int nranks, ncclUniqueId id, int rank) {
    if (!out) return global_fail(ncclInvalidArgument, "ncclCommInitRank: a null communicator pointer");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return global_fail(ncclInvalidArgument, format("ncclCommInitRank: rank %d of %d ranks", rank, nranks));
    const std::string name(id.internal, strnlen(id.internal, kIdBytes));
    if (name.rfind(kIdPrefix, 0) != 0)
        return global_fail(ncclInvalidArgument, "ncclCommInitRank: the unique id was not made by the virtual NCCL's ncclGetUniqueId");
    auto comm = std::make_shared<Comm>();
    comm->rank = rank;
    comm->nranks = nranks;
    comm->peers.assign(rank == 0 ? nranks : 1, -1);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(init_timeout_s());
    auto ms_left = [&] {
        return (int)std::max<long long>(0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count());
    };
    Header hello;
    hello.kind = kHello;
    hello.rank = rank;
    hello.nranks = nranks;
    if (rank == 0) {
        int listener;
        {
            std::lock_guard<std::mutex> g(global_lock);
            auto it = listeners.find(name);
            if (it == listeners.end())
                return global_fail(ncclInvalidUsage, "ncclCommInitRank: rank 0 must use a unique id made by ncclGetUniqueId in its own process");
            listener = it->second;
            listeners.erase(it);
        }
        for (int joined = 1; joined < nranks;) {
            pollfd p{listener, POLLIN, 0};
            if (::poll(&p, 1, ms_left()) <= 0) {
                ::close(listener);
                return global_fail(ncclSystemError, format("ncclCommInitRank: rank 0 waited %.0f s (INVASPREAD_NCCL_INIT_TIMEOUT_S) and %d of %d ranks joined",
                                                           init_timeout_s(), joined, nranks));
            }
            const int fd = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
            Header got;
            if (fd < 0) continue;
            if (!recv_all(fd, &got, sizeof got) || got.magic != kMagic || got.kind != kHello || got.nranks != nranks ||
                got.rank < 1 || got.rank >= nranks || comm->peers[got.rank] >= 0) {
                ::close(fd);
                ::close(listener);
                return global_fail(ncclInvalidUsage, format("ncclCommInitRank: a rank joined as rank %d of %d where rank 0 has %d ranks (or twice)",
                                                            got.rank, got.nranks, nranks));
            }
            comm->peers[got.rank] = fd;
            ++joined;
        }
        ::close(listener);
        for (int k = 1; k < nranks; ++k) send_all(comm->peers[k], &hello, sizeof hello);
    } else {
        socklen_t len;
        const sockaddr_un addr = address_of(name, &len);
        int fd = -1;
        while (fd < 0) {
            fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd >= 0 && ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), len) == 0) break;
            if (fd >= 0) ::close(fd);
            fd = -1;
            if (ms_left() == 0)
                return global_fail(ncclSystemError, format("ncclCommInitRank: rank %d found no rank 0 at %s within %.0f s", rank, name.c_str(), init_timeout_s()));
            ::usleep(20000);
        }
        Header welcome;
        pollfd p{fd, POLLIN, 0};
        if (!send_all(fd, &hello, sizeof hello) || ::poll(&p, 1, ms_left()) <= 0 || !recv_all(fd, &welcome, sizeof welcome) ||
            welcome.kind != kHello) {
            ::close(fd);
            return global_fail(ncclRemoteError, format("ncclCommInitRank: rank 0 refused or left before rank %d was welcomed", rank));
        }
        comm->peers[0] = fd;
    }
    *out = new Handle{std::move(comm)};
    return ncclSuccess;
}

int ncclCommInitRankConfig(Handle** out, int nranks, ncclUniqueId id, int rank, void*) {
    return ncclCommInitRank(out, nranks, id, rank);
}

int ncclCommCount(const Handle* comm, int* count) {
    if (!comm || !count) return ncclInvalidArgument;
    *count = comm->comm->nranks;
    return ncclSuccess;
}
int ncclCommUserRank(const Handle* comm, int* rank) {
    if (!comm || !rank) return ncclInvalidArgument;
    *rank = comm->comm->rank;
    return ncclSuccess;
}
int ncclCommCuDevice(const Handle* comm, int* device) {
    if (!comm || !device) return ncclInvalidArgument;
    *device = comm->comm->device;
    return ncclSuccess;
}
int ncclCommGetAsyncError(Handle* comm, int* result) {
    if (!comm || !result) return ncclInvalidArgument;
    *result = comm->comm->async_error.load();
    return ncclSuccess;
}
int ncclCommFinalize(Handle* comm) { return comm ? ncclSuccess : ncclInvalidArgument; }
int ncclCommDestroy(Handle* comm) {
    delete comm;  // the Comm lives on while a queued collective holds it
    return ncclSuccess;
}
// Stops every collective of the communicator, also one waiting in a stream operation on another
// thread (its socket reads return), and frees the handle.
int ncclCommAbort(Handle* comm) {
    if (!comm) return ncclSuccess;
    comm->comm->aborted = true;
    comm->comm->wake_all();
    for (int fd : comm->comm->peers)
        if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
    delete comm;
    return ncclSuccess;
}

int ncclGroupStart() { return ncclSuccess; }
int ncclGroupEnd() { return ncclSuccess; }

int ncclAllReduce(const void* send, void* recv, std::size_t count, int type, int op, Handle* comm, CUstream stream) {
    return queue(comm, kAllReduce, send, recv, count, type, op, 0, stream);
}
int ncclAllGather(const void* send, void* recv, std::size_t count, int type, Handle* comm, CUstream stream) {
    return queue(comm, kAllGather, send, recv, count, type, 0, 0, stream);
}
int ncclReduceScatter(const void* send, void* recv, std::size_t count, int type, int op, Handle* comm, CUstream stream) {
    return queue(comm, kReduceScatter, send, recv, count, type, op, 0, stream);
}
int ncclBroadcast(const void* send, void* recv, std::size_t count, int type, int root, Handle* comm, CUstream stream) {
    return queue(comm, kBroadcast, send, recv, count, type, 0, root, stream);
}

}  // extern "C"
