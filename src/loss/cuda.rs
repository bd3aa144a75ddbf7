//! The instance loss on the GPU: every kernel version behind one launcher.
//!
//! | version | kernels (kernels/) | N x N stored | launches (fwd + bwd) |
//! |---|---|---|---|
//! | `unfused` | normalize, matmul_v1, exp, row sums, row terms, grad matrix, matmul_v1 x1-2, normalize bwd, mean | S, E, G | 9-10 |
//! | `unfused-cublas` | as `unfused` with cuBLAS SGEMM for the three products | S, E, G | 9-10 |
//! | `fused-v1` | normalize, instance_loss_query_v1, (instance_loss_key_v1 both-sides), normalize bwd, mean | no | 4-5 |
//! | `fused-v2` | instance_loss_norms_v2, instance_loss_query_v2, (instance_loss_key_v2 both-sides) | no, O(N) extra | 2-3 |
//!
//! A [`CudaLoss`] owns the scratch buffers of one version for one shape, so repeated calls
//! (training steps, benchmark iterations) allocate nothing. [`CudaLoss::enqueue`] only queues
//! work on the GPU's stream; [`CudaLoss::loss`] waits and reads the scalar back.

use std::sync::Arc;

use cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{validate_input, GradSemantics, LossConfig};
use crate::cuda::{to_i32, Gpu};
use crate::error::{Error, Result};
use crate::ops::normalize_rows;

/// Below this tau the kernels' fixed offset exp((s - 1) / tau) can underflow to 0 in float32
/// for a whole row (exp(-2 / tau) < FLT_MIN near tau = 0.023).
pub const MIN_TAU: f64 = 0.025;

/// The kernels' parameters, the same fields in the same order as `LossParams` in
/// kernels/loss_common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    pub n: i32,
    pub d: i32,
    pub inv_tau: f32,
    pub mu: f32,
    pub grad_scale: f32,
    pub with_grad: i32,
    pub both_sides: i32,
}

// SAFETY: #[repr(C)] plain old data, laid out exactly as the CUDA struct.
unsafe impl DeviceRepr for LossParams {}

/// The GPU implementations of the loss, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CudaLossVersion {
    /// One kernel per step, N x N matrices stored, own tiled matmul.
    Unfused,
    /// One kernel per step, N x N matrices stored, cuBLAS SGEMM.
    UnfusedCublas,
    /// Fused, one block per row, three sweeps recomputing dot products.
    FusedV1,
    /// Fused, tiled, O(N) extra memory, at most 3 launches.
    FusedV2,
}

impl CudaLossVersion {
    /// Every version, oldest first.
    pub const ALL: [CudaLossVersion; 4] = [
        CudaLossVersion::Unfused,
        CudaLossVersion::UnfusedCublas,
        CudaLossVersion::FusedV1,
        CudaLossVersion::FusedV2,
    ];

    /// The name used on the command line and in tables.
    pub fn name(self) -> &'static str {
        match self {
            CudaLossVersion::Unfused => "unfused",
            CudaLossVersion::UnfusedCublas => "unfused-cublas",
            CudaLossVersion::FusedV1 => "fused-v1",
            CudaLossVersion::FusedV2 => "fused-v2",
        }
    }

    fn stores_nxn(self) -> bool {
        matches!(
            self,
            CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas
        )
    }
}

/// Checks what the kernels need beyond the loss's own rules.
pub fn validate_for_kernels(cfg: &LossConfig) -> Result<()> {
    cfg.validate()?;
    if cfg.tau < MIN_TAU {
        return Err(Error::invalid(format!(
            "tau = {} is below {MIN_TAU}: the CUDA kernels' fixed offset exp((s - 1)/tau) can underflow in float32; use --device cpu",
            cfg.tau
        )));
    }
    Ok(())
}

/// Per-row scalars (O(N)), shared by every version.
struct RowBuffers {
    row_loss: CudaSlice<f64>,
    inv_denom: CudaSlice<f32>,
    r: CudaSlice<f32>,
    dominant: CudaSlice<i32>,
    g_partner: CudaSlice<f32>,
    g_dominant: CudaSlice<f32>,
}

/// Scratch of the unfused chain.
struct UnfusedBuffers {
    s: CudaSlice<f32>,
    e: CudaSlice<f32>,
    g: CudaSlice<f32>,
    x_partner: CudaSlice<f32>,
    denom: CudaSlice<f64>,
    one_minus_q_max: CudaSlice<f64>,
    q_max: CudaSlice<f64>,
    cublas: Option<CudaBlas>,
}

/// One version's launcher and scratch for one (N, d).
pub struct CudaLoss {
    gpu: Arc<Gpu>,
    version: CudaLossVersion,
    n: usize,
    d: usize,
    norms: CudaSlice<f32>,
    inv_norms: CudaSlice<f32>,
    /// The normalised F (unfused and v1 only).
    f: Option<CudaSlice<f32>>,
    /// dL/dF before the normalisation backward (unfused and v1 only).
    df: Option<CudaSlice<f32>>,
    rows: RowBuffers,
    unfused: Option<UnfusedBuffers>,
    block_loss: CudaSlice<f64>,
    counter: CudaSlice<u32>,
    loss: CudaSlice<f64>,
    extra_bytes: usize,
}

const BLOCK: u32 = 256;
const V2_TILE: usize = 64;

fn grid_1d(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `total` elements.
fn grid_stride(total: usize) -> LaunchConfig {
    grid_1d(total.div_ceil(BLOCK as usize).min(1 << 20))
}

/// An NVTX range named after the phase, when libnvToolsExt is there (Nsight shows the name).
fn phase(name: &str) -> Option<cudarc::nvtx::safe::Range> {
    static PRESENT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: only tries to open the library.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::nvtx::sys::is_culib_present() });
    present.then(|| cudarc::nvtx::safe::scoped_range(name))
}

impl CudaLoss {
    /// Allocates the scratch of `version` for N x d inputs.
    pub fn new(gpu: Arc<Gpu>, version: CudaLossVersion, n: usize, d: usize) -> Result<Self> {
        if n < 4 || n % 2 != 0 || d == 0 {
            return Err(Error::invalid(format!(
                "N = {n}, d = {d}: expected an even N >= 4 and d >= 1"
            )));
        }
        to_i32("N", n)?;
        to_i32("d", d)?;
        if version.stores_nxn() {
            n.checked_mul(n)
                .and_then(|x| x.checked_mul(12))
                .ok_or_else(|| {
                    Error::invalid(format!("N = {n} is too large for the unfused chain"))
                })?;
        }
        let stream = gpu.stream().clone();
        let mut extra = 0usize;
        let mut zeros_f32 = |len: usize| -> Result<CudaSlice<f32>> {
            extra += len * 4;
            Ok(stream.alloc_zeros::<f32>(len)?)
        };
        let norms = zeros_f32(n)?;
        let inv_norms = zeros_f32(n)?;
        let stores_f = !matches!(version, CudaLossVersion::FusedV2);
        let f = if stores_f {
            Some(zeros_f32(n * d)?)
        } else {
            None
        };
        let df = if stores_f {
            Some(zeros_f32(n * d)?)
        } else {
            None
        };
        let rows = RowBuffers {
            row_loss: stream.alloc_zeros::<f64>(n)?,
            inv_denom: zeros_f32(n)?,
            r: zeros_f32(n)?,
            dominant: stream.alloc_zeros::<i32>(n)?,
            g_partner: zeros_f32(n)?,
            g_dominant: zeros_f32(n)?,
        };
        let unfused = if version.stores_nxn() {
            let cublas = if version == CudaLossVersion::UnfusedCublas {
                // SAFETY: only tries to open the library.
                if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                    return Err(Error::Cuda(
                        "libcublas was not found (add its folder to LD_LIBRARY_PATH)".into(),
                    ));
                }
                Some(
                    CudaBlas::new(stream.clone())
                        .map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))?,
                )
            } else {
                None
            };
            Some(UnfusedBuffers {
                s: zeros_f32(n * n)?,
                e: zeros_f32(n * n)?,
                g: zeros_f32(n * n)?,
                x_partner: zeros_f32(n)?,
                denom: stream.alloc_zeros::<f64>(n)?,
                one_minus_q_max: stream.alloc_zeros::<f64>(n)?,
                q_max: stream.alloc_zeros::<f64>(n)?,
                cublas,
            })
        } else {
            None
        };
        let blocks = n.div_ceil(V2_TILE);
        let block_loss = stream.alloc_zeros::<f64>(blocks)?;
        let counter = stream.alloc_zeros::<u32>(1)?;
        let loss = stream.alloc_zeros::<f64>(1)?;
        extra +=
            n * (8 + 4) + blocks * 8 + 4 + 8 + if version.stores_nxn() { n * 8 * 3 } else { 0 };
        Ok(CudaLoss {
            gpu,
            version,
            n,
            d,
            norms,
            inv_norms,
            f,
            df,
            rows,
            unfused,
            block_loss,
            counter,
            loss,
            extra_bytes: extra,
        })
    }

    pub fn version(&self) -> CudaLossVersion {
        self.version
    }

    /// Device memory this version uses beyond z and dz, in bytes.
    pub fn extra_bytes(&self) -> usize {
        self.extra_bytes
    }

    /// Kernel launches of one call (forward, plus backward when `with_grad`).
    pub fn launches(&self, cfg: &LossConfig, with_grad: bool) -> usize {
        let both = with_grad && cfg.semantics == GradSemantics::BothSides;
        match self.version {
            CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas => {
                6 + if with_grad { 3 + both as usize } else { 0 }
            }
            CudaLossVersion::FusedV1 => 3 + if with_grad { 1 + both as usize } else { 0 },
            CudaLossVersion::FusedV2 => 2 + both as usize,
        }
    }

    /// Queues the loss of `z` (N x d) and, when `dz` is given, dL/dz into it. Nothing is
    /// read back; call [`CudaLoss::loss`] for the scalar.
    pub fn enqueue(
        &mut self,
        z: &CudaSlice<f32>,
        dz: Option<&mut CudaSlice<f32>>,
        cfg: &LossConfig,
    ) -> Result<()> {
        validate_for_kernels(cfg)?;
        let (n, d) = (self.n, self.d);
        if z.len() != n * d || dz.as_ref().is_some_and(|g| g.len() != n * d) {
            return Err(Error::invalid(format!(
                "z and dz must hold N x d = {n} x {d} floats"
            )));
        }
        let with_grad = dz.is_some();
        let params = LossParams {
            n: n as i32,
            d: d as i32,
            inv_tau: (1.0 / cfg.tau) as f32,
            mu: cfg.mu as f32,
            grad_scale: (1.0 / (n as f64 * cfg.tau)) as f32,
            with_grad: with_grad as i32,
            both_sides: (cfg.semantics == GradSemantics::BothSides) as i32,
        };
        match self.version {
            CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas => {
                self.enqueue_unfused(z, dz, &params)
            }
            CudaLossVersion::FusedV1 => self.enqueue_v1(z, dz, &params),
            CudaLossVersion::FusedV2 => self.enqueue_v2(z, dz, &params),
        }
    }

    /// The device scalar (float64) the queued work writes the loss into.
    pub fn loss_buffer(&self) -> &CudaSlice<f64> {
        &self.loss
    }

    /// Waits for the queued work and returns the loss.
    pub fn loss(&self) -> Result<f64> {
        let host = self.gpu.stream().clone_dtoh(&self.loss)?;
        Ok(host[0])
    }

    fn mean_of_rows(&mut self) -> Result<()> {
        let _p = phase("loss mean");
        let func = self.gpu.function("reduce", "row_mean_v1")?;
        let n = self.n as i32;
        let mut l = self.gpu.stream().launch_builder(&func);
        l.arg(&self.rows.row_loss).arg(&n).arg(&mut self.loss);
        // SAFETY: row_mean_v1(const double* x, int n, double* out); x holds N doubles.
        unsafe { l.launch(grid_1d(1)) }?;
        Ok(())
    }

    fn normalise_forward(&mut self, z: &CudaSlice<f32>) -> Result<()> {
        let _p = phase("normalise rows");
        let f = self
            .f
            .as_mut()
            .ok_or_else(|| Error::Cuda("no F buffer".into()))?;
        normalize_rows::forward_cuda(&self.gpu, z, f, &mut self.norms, self.n, self.d)
    }

    fn normalise_backward(&mut self, dz: &mut CudaSlice<f32>) -> Result<()> {
        let _p = phase("normalisation backward");
        let (f, df) = match (&self.f, &self.df) {
            (Some(f), Some(df)) => (f, df),
            _ => return Err(Error::Cuda("no F/dF buffers".into())),
        };
        normalize_rows::backward_cuda(&self.gpu, f, &self.norms, df, dz, self.n, self.d)
    }

    /// C = alpha * op(A) op(B) (+ C), through matmul_v1 or cuBLAS; the three products of the
    /// chain are named by `product`.
    fn product(&mut self, product: Product, alpha: f32) -> Result<()> {
        let (n, d) = (self.n, self.d);
        let stream = self.gpu.stream().clone();
        let ub = self
            .unfused
            .as_mut()
            .ok_or_else(|| Error::Cuda("no unfused buffers".into()))?;
        let f = self
            .f
            .as_ref()
            .ok_or_else(|| Error::Cuda("no F buffer".into()))?;
        let df = self
            .df
            .as_mut()
            .ok_or_else(|| Error::Cuda("no dF buffer".into()))?;
        if let Some(blas) = &ub.cublas {
            // cuBLAS is column-major: a row-major R x C matrix is its C x R transpose there.
            let (t, nt) = (
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
            );
            let (ni, di) = (n as i32, d as i32);
            let result = match product {
                // S (N x N) = F F^T: col-major S = (F^T)^T F^T with F^T = F's buffer, ld d.
                Product::Similarity => {
                    let cfg = GemmConfig {
                        transa: t,
                        transb: nt,
                        m: ni,
                        n: ni,
                        k: di,
                        alpha,
                        lda: di,
                        ldb: di,
                        beta: 0.0,
                        ldc: ni,
                    };
                    // SAFETY: buffer sizes match the dimensions above.
                    unsafe { blas.gemm(cfg, f, f, &mut ub.s) }
                }
                // dF^T (d x N) = F^T (d x N) G^T (N x N): G's row-major buffer is G^T col-major.
                Product::GradQuery => {
                    let cfg = GemmConfig {
                        transa: nt,
                        transb: nt,
                        m: di,
                        n: ni,
                        k: ni,
                        alpha,
                        lda: di,
                        ldb: ni,
                        beta: 0.0,
                        ldc: di,
                    };
                    // SAFETY: as above.
                    unsafe { blas.gemm(cfg, f, &ub.g, df) }
                }
                // dF^T += F^T G, i.e. (G^T F)^T added.
                Product::GradKey => {
                    let cfg = GemmConfig {
                        transa: nt,
                        transb: t,
                        m: di,
                        n: ni,
                        k: ni,
                        alpha,
                        lda: di,
                        ldb: ni,
                        beta: 1.0,
                        ldc: di,
                    };
                    // SAFETY: as above.
                    unsafe { blas.gemm(cfg, f, &ub.g, df) }
                }
            };
            return result.map_err(|e| Error::Cuda(format!("cuBLAS SGEMM: {e:?}")));
        }
        let func = self.gpu.function("matmul", "matmul_v1")?;
        // (M, N, K, a strides, b strides, ldc, beta)
        let (m, cols, k, a_rs, a_cs, b_rs, b_cs, ldc, beta): (
            i32,
            i32,
            i32,
            i64,
            i64,
            i64,
            i64,
            i64,
            f32,
        ) = match product {
            Product::Similarity => (
                n as i32, n as i32, d as i32, d as i64, 1, 1, d as i64, n as i64, 0.0,
            ),
            Product::GradQuery => (
                n as i32, d as i32, n as i32, n as i64, 1, d as i64, 1, d as i64, 0.0,
            ),
            Product::GradKey => (
                n as i32, d as i32, n as i32, 1, n as i64, d as i64, 1, d as i64, 1.0,
            ),
        };
        let (a, out) = match product {
            Product::Similarity => (f, &mut ub.s),
            Product::GradQuery | Product::GradKey => (&ub.g, df),
        };
        let mut l = stream.launch_builder(&func);
        l.arg(&m)
            .arg(&cols)
            .arg(&k)
            .arg(a)
            .arg(&a_rs)
            .arg(&a_cs)
            .arg(f)
            .arg(&b_rs)
            .arg(&b_cs)
            .arg(out)
            .arg(&ldc)
            .arg(&alpha)
            .arg(&beta);
        let cfg = LaunchConfig {
            grid_dim: ((cols as u32).div_ceil(64), (m as u32).div_ceil(64), 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matmul_v1's signature; the strides address inside the buffers (checked shapes).
        unsafe { l.launch(cfg) }?;
        Ok(())
    }

    fn enqueue_unfused(
        &mut self,
        z: &CudaSlice<f32>,
        dz: Option<&mut CudaSlice<f32>>,
        p: &LossParams,
    ) -> Result<()> {
        let n = self.n;
        self.normalise_forward(z)?;
        {
            let _p = phase("similarity matrix");
            self.product(Product::Similarity, 1.0)?;
        }
        let stream = self.gpu.stream().clone();
        let ub = self
            .unfused
            .as_mut()
            .ok_or_else(|| Error::Cuda("no unfused buffers".into()))?;
        {
            let _p = phase("masked exp");
            let func = self
                .gpu
                .function("instance_loss_unfused", "unfused_exp_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&ub.s).arg(&mut ub.e).arg(&p.n).arg(&p.inv_tau);
            // SAFETY: unfused_exp_v1(const float* S, float* E, int n, float inv_tau); N x N each.
            unsafe { l.launch(grid_stride(n * n)) }?;
        }
        {
            let _p = phase("row sums");
            let func = self
                .gpu
                .function("instance_loss_unfused", "unfused_row_sums_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&ub.s)
                .arg(&ub.e)
                .arg(p)
                .arg(&mut ub.x_partner)
                .arg(&mut self.rows.dominant)
                .arg(&mut ub.denom);
            l.arg(&mut ub.one_minus_q_max).arg(&mut ub.q_max);
            // SAFETY: the kernel's signature; one block per row.
            unsafe { l.launch(grid_1d(n)) }?;
        }
        {
            let _p = phase("row terms");
            let func = self
                .gpu
                .function("instance_loss_unfused", "unfused_row_terms_v1")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&ub.e)
                .arg(p)
                .arg(&ub.x_partner)
                .arg(&self.rows.dominant)
                .arg(&ub.denom)
                .arg(&ub.one_minus_q_max);
            l.arg(&ub.q_max)
                .arg(&mut self.rows.row_loss)
                .arg(&mut self.rows.r)
                .arg(&mut self.rows.g_partner);
            l.arg(&mut self.rows.g_dominant);
            // SAFETY: the kernel's signature; one block per row.
            unsafe { l.launch(grid_1d(n)) }?;
        }
        if let Some(dz) = dz {
            {
                let _p = phase("gradient matrix");
                let func = self
                    .gpu
                    .function("instance_loss_unfused", "unfused_grad_matrix_v1")?;
                let mut l = stream.launch_builder(&func);
                l.arg(&ub.e)
                    .arg(p)
                    .arg(&ub.denom)
                    .arg(&self.rows.dominant)
                    .arg(&self.rows.r);
                l.arg(&self.rows.g_partner)
                    .arg(&self.rows.g_dominant)
                    .arg(&mut ub.g);
                // SAFETY: the kernel's signature; N x N.
                unsafe { l.launch(grid_stride(n * n)) }?;
            }
            {
                let _p = phase("G F");
                self.product(Product::GradQuery, p.grad_scale)?;
                if p.both_sides != 0 {
                    self.product(Product::GradKey, p.grad_scale)?;
                }
            }
            self.normalise_backward(dz)?;
        }
        self.mean_of_rows()
    }

    fn enqueue_v1(
        &mut self,
        z: &CudaSlice<f32>,
        dz: Option<&mut CudaSlice<f32>>,
        p: &LossParams,
    ) -> Result<()> {
        let n = self.n;
        self.normalise_forward(z)?;
        let stream = self.gpu.stream().clone();
        let f = self
            .f
            .as_ref()
            .ok_or_else(|| Error::Cuda("no F buffer".into()))?;
        let df = self
            .df
            .as_mut()
            .ok_or_else(|| Error::Cuda("no dF buffer".into()))?;
        {
            let _p = phase("fused v1: query rows");
            let func = self
                .gpu
                .function("instance_loss_fused_v1", "instance_loss_query_v1")?;
            let rows = &mut self.rows;
            let mut l = stream.launch_builder(&func);
            l.arg(f)
                .arg(p)
                .arg(&mut rows.row_loss)
                .arg(&mut rows.inv_denom)
                .arg(&mut rows.r)
                .arg(&mut rows.dominant);
            l.arg(&mut rows.g_partner)
                .arg(&mut rows.g_dominant)
                .arg(&mut *df);
            // SAFETY: instance_loss_query_v1's signature; one block per row.
            unsafe { l.launch(grid_1d(n)) }?;
        }
        if p.with_grad != 0 && p.both_sides != 0 {
            let _p = phase("fused v1: key rows");
            let func = self
                .gpu
                .function("instance_loss_fused_v1", "instance_loss_key_v1")?;
            let rows = &self.rows;
            let mut l = stream.launch_builder(&func);
            l.arg(f)
                .arg(p)
                .arg(&rows.inv_denom)
                .arg(&rows.r)
                .arg(&rows.dominant)
                .arg(&rows.g_partner);
            l.arg(&rows.g_dominant).arg(&mut *df);
            // SAFETY: instance_loss_key_v1's signature; one block per key row.
            unsafe { l.launch(grid_1d(n)) }?;
        }
        if let Some(dz) = dz {
            self.normalise_backward(dz)?;
        }
        self.mean_of_rows()
    }

    fn enqueue_v2(
        &mut self,
        z: &CudaSlice<f32>,
        dz: Option<&mut CudaSlice<f32>>,
        p: &LossParams,
    ) -> Result<()> {
        let n = self.n;
        let stream = self.gpu.stream().clone();
        {
            let _p = phase("fused v2: norms");
            let func = self
                .gpu
                .function("instance_loss_fused_v2", "instance_loss_norms_v2")?;
            let mut l = stream.launch_builder(&func);
            l.arg(z)
                .arg(&p.n)
                .arg(&p.d)
                .arg(&mut self.norms)
                .arg(&mut self.inv_norms);
            // SAFETY: the kernel's signature; one warp per row.
            unsafe { l.launch(grid_1d(n.div_ceil(8))) }?;
        }
        // Without a gradient the kernel never touches dz, but it still takes a pointer.
        let mut placeholder;
        let dz = match dz {
            Some(dz) => dz,
            None => {
                placeholder = stream.alloc_zeros::<f32>(1)?;
                &mut placeholder
            }
        };
        let grid = grid_1d(n.div_ceil(V2_TILE));
        {
            let _p = phase("fused v2: query rows");
            let func = self
                .gpu
                .function("instance_loss_fused_v2", "instance_loss_query_v2")?;
            let rows = &mut self.rows;
            let mut l = stream.launch_builder(&func);
            l.arg(z)
                .arg(&self.norms)
                .arg(&self.inv_norms)
                .arg(p)
                .arg(&mut rows.inv_denom)
                .arg(&mut rows.r);
            l.arg(&mut rows.dominant)
                .arg(&mut rows.g_partner)
                .arg(&mut rows.g_dominant)
                .arg(&mut *dz);
            l.arg(&mut self.block_loss)
                .arg(&mut self.counter)
                .arg(&mut self.loss);
            // SAFETY: instance_loss_query_v2's signature; dz is N x d when with_grad is set.
            unsafe { l.launch(grid) }?;
        }
        if p.with_grad != 0 && p.both_sides != 0 {
            let _p = phase("fused v2: key rows");
            let func = self
                .gpu
                .function("instance_loss_fused_v2", "instance_loss_key_v2")?;
            let rows = &self.rows;
            let mut l = stream.launch_builder(&func);
            l.arg(z)
                .arg(&self.norms)
                .arg(&self.inv_norms)
                .arg(p)
                .arg(&rows.inv_denom)
                .arg(&rows.r);
            l.arg(&rows.dominant)
                .arg(&rows.g_partner)
                .arg(&rows.g_dominant)
                .arg(&mut *dz);
            // SAFETY: instance_loss_key_v2's signature.
            unsafe { l.launch(grid) }?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Product {
    Similarity,
    GradQuery,
    GradKey,
}

/// The whole round trip for host data: upload, compute, download. For the CLI and tests.
pub fn instance_loss(
    gpu: Arc<Gpu>,
    version: CudaLossVersion,
    z: &[f32],
    n: usize,
    d: usize,
    cfg: &LossConfig,
    with_grad: bool,
) -> Result<(f64, Option<Vec<f32>>)> {
    validate_for_kernels(cfg)?;
    validate_input(z, n, d)?;
    let stream = gpu.stream().clone();
    let mut loss = CudaLoss::new(gpu, version, n, d)?;
    let z_dev = stream.clone_htod(z)?;
    if with_grad {
        let mut dz = stream.clone_htod(&vec![f32::NAN; n * d])?; // poisoned: unwritten shows
        loss.enqueue(&z_dev, Some(&mut dz), cfg)?;
        let value = loss.loss()?;
        Ok((value, Some(stream.clone_dtoh(&dz)?)))
    } else {
        loss.enqueue(&z_dev, None, cfg)?;
        Ok((loss.loss()?, None))
    }
}
