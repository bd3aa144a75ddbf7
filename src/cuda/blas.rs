//! The one cuBLAS front of the crate: every GEMM (convolutions, linear layers, the kNN search,
//! the `unfused-cublas` loss) is a row-major [`Gemm`] handed to a [`Queue`], and on a GPU it
//! goes through [`Blas`]: one handle on the GPU's stream, the tested row-major to column-major
//! mapping ([`cublas_config`]), and the operand conversion of the bf16 mode
//! (`kernels/blas.cu`, `f32_to_bf16_v1`).

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::cublas::{CudaBlas, GemmConfig};
use cudarc::driver::CudaSlice;

use super::launch::{
    to_i32, DevPtr, DevPtrMut, Gemm, GemmPrecision, Geometry, Kernel, KernelArgs, Queue,
};
use super::Gpu;
use crate::error::{Error, Result};

/// cuBLAS's column-major call for the row-major product C (m x n) = alpha op(A) op(B) + beta C
/// (op(A) m x k, op(B) k x n, row strides lda, ldb, ldc). A row-major matrix is, to cuBLAS,
/// its transpose, so the call computes C^T = op(B)^T op(A)^T: the operands swap places (pass
/// B's buffer first), and so do their transposition flags and m and n.
#[allow(clippy::too_many_arguments)] // the GEMM's own parameters, as cuBLAS takes them
pub fn cublas_config(
    trans_a: bool,
    trans_b: bool,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    lda: usize,
    ldb: usize,
    beta: f32,
    ldc: usize,
) -> Result<GemmConfig<f32>> {
    let op = |t: bool| {
        if t {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    };
    Ok(GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: to_i32("GEMM n", n)?,
        n: to_i32("GEMM m", m)?,
        k: to_i32("GEMM k", k)?,
        alpha,
        lda: to_i32("GEMM ldb", ldb)?,
        ldb: to_i32("GEMM lda", lda)?,
        beta,
        ldc: to_i32("GEMM ldc", ldc)?,
    })
}

const F32_TO_BF16_V1: Kernel = Kernel::new("blas", "f32_to_bf16_v1");

/// bfloat16 copies of a GEMM's two operands, grown on demand.
struct Bf16Operands {
    a: CudaSlice<u16>,
    b: CudaSlice<u16>,
}

/// cuBLAS on one GPU's stream; see the module documentation.
pub struct Blas {
    handle: CudaBlas,
    bf16: Mutex<Option<Bf16Operands>>,
}

fn cublas_err(e: cudarc::cublas::result::CublasError) -> Error {
    Error::Cuda(format!("cuBLAS GEMM: {e:?}"))
}

impl Blas {
    /// A handle on `gpu`'s stream; an error when libcublas is missing.
    pub fn new(gpu: &Gpu) -> Result<Blas> {
        // SAFETY: only tries to open the library.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "libcublas was not found (add its folder to LD_LIBRARY_PATH)".into(),
            ));
        }
        let handle = CudaBlas::new(gpu.stream().clone())
            .map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))?;
        Ok(Blas {
            handle,
            bf16: Mutex::new(None),
        })
    }

    /// Queues `g` on `gpu`'s stream.
    pub fn gemm(&self, gpu: &Gpu, g: &Gemm<'_>) -> Result<()> {
        g.check()?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let cfg = cublas_config(
            g.trans_a,
            g.trans_b,
            (g.m, g.n, g.k),
            g.alpha,
            g.lda,
            g.ldb,
            g.beta,
            g.ldc,
        )?;
        // cuBLAS computes C^T = op(B)^T op(A)^T: B's buffer goes first.
        let (first, second) = (g.b, g.a);
        match g.precision {
            GemmPrecision::F32 => {
                // SAFETY: `check` proved that each buffer holds its matrix; the handle is
                // bound to the GPU's stream, which orders this call after the writes of the
                // operands.
                unsafe {
                    cudarc::cublas::result::sgemm(
                        *self.handle.handle(),
                        cfg.transa,
                        cfg.transb,
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        &cfg.alpha,
                        first.addr() as *const f32,
                        cfg.lda,
                        second.addr() as *const f32,
                        cfg.ldb,
                        &cfg.beta,
                        g.c.addr() as *mut f32,
                        cfg.ldc,
                    )
                }
                .map_err(cublas_err)
            }
            GemmPrecision::Tf32 => self.gemm_ex(
                &cfg,
                (first.addr(), second.addr(), g.c.addr()),
                cudaDataType::CUDA_R_32F,
                cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
            GemmPrecision::Bf16 => {
                let mut ops = self
                    .bf16
                    .lock()
                    .map_err(|_| Error::Cuda("the bf16 operand lock was poisoned".into()))?;
                let stream = gpu.stream();
                let grow = ops
                    .as_ref()
                    .is_none_or(|o| o.a.len() < first.len() || o.b.len() < second.len());
                if grow {
                    let have = |f: fn(&Bf16Operands) -> usize| ops.as_ref().map_or(0, f);
                    let (la, lb) = (
                        first.len().max(have(|o| o.a.len())).max(1),
                        second.len().max(have(|o| o.b.len())).max(1),
                    );
                    *ops = Some(Bf16Operands {
                        a: stream.alloc_zeros::<u16>(la)?,
                        b: stream.alloc_zeros::<u16>(lb)?,
                    });
                }
                let o = ops
                    .as_mut()
                    .ok_or_else(|| Error::Cuda("bf16 operands missing".into()))?;
                let mut a16 = DevPtrMut::of(&mut o.a);
                let mut b16 = DevPtrMut::of(&mut o.b);
                to_bf16(gpu, first, &mut a16)?;
                to_bf16(gpu, second, &mut b16)?;
                self.gemm_ex(
                    &cfg,
                    (a16.addr(), b16.addr(), g.c.addr()),
                    cudaDataType::CUDA_R_16BF,
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                )
            }
        }
    }

    /// cublasGemmEx on operands already in cuBLAS's order, of type `input`, into float32 C.
    fn gemm_ex(
        &self,
        cfg: &GemmConfig<f32>,
        (a, b, c): (u64, u64, u64),
        input: cudaDataType,
        compute: cublasComputeType_t,
    ) -> Result<()> {
        // SAFETY: as for SGEMM; the bf16 copies hold the operands' full extents, and alpha and
        // beta are float32 as CUBLAS_COMPUTE_32F* requires.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.handle.handle(),
                cfg.transa,
                cfg.transb,
                cfg.m,
                cfg.n,
                cfg.k,
                &cfg.alpha as *const f32 as *const c_void,
                a as *const c_void,
                input,
                cfg.lda,
                b as *const c_void,
                input,
                cfg.ldb,
                &cfg.beta as *const f32 as *const c_void,
                c as *mut c_void,
                cudaDataType::CUDA_R_32F,
                cfg.ldc,
                compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(cublas_err)
    }
}

/// bf16 copy of every element of `x` into the front of `out` (`f32_to_bf16_v1`).
pub fn to_bf16(q: &impl Queue, x: DevPtr<'_, f32>, out: &mut DevPtrMut<'_, u16>) -> Result<()> {
    super::launch::check_len("bf16 operand", out.len(), x.len())?;
    let mut args = KernelArgs::new();
    args.input(x).output(out).value(x.len() as i64);
    // SAFETY: f32_to_bf16_v1(const float* x, unsigned short* y, long long len); x holds len
    // floats and out at least len (checked above).
    unsafe { q.launch(F32_TO_BF16_V1, Geometry::grid_stride(x.len()), &mut args) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cuBLAS's SGEMM as its documentation defines it: column-major, element (i, j) of a
    /// matrix with leading dimension ld at i + j ld; C (m x n) = alpha op(A) op(B) + beta C.
    fn column_major_sgemm(cfg: &GemmConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let t = |op: cublasOperation_t| op == cublasOperation_t::CUBLAS_OP_T;
        let (m, n, k) = (cfg.m as usize, cfg.n as usize, cfg.k as usize);
        let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
        let at = |i: usize, l: usize| {
            if t(cfg.transa) {
                a[l + i * lda]
            } else {
                a[i + l * lda]
            }
        };
        let bt = |l: usize, j: usize| {
            if t(cfg.transb) {
                b[j + l * ldb]
            } else {
                b[l + j * ldb]
            }
        };
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|l| f64::from(at(i, l)) * f64::from(bt(l, j)))
                    .sum();
                let c_ij = &mut c[i + j * ldc];
                *c_ij = (f64::from(cfg.alpha) * s + f64::from(cfg.beta) * f64::from(*c_ij)) as f32;
            }
        }
    }

    #[test]
    fn the_cublas_call_computes_the_row_major_product() {
        let (m, n, k) = (5usize, 7usize, 3usize);
        let mut r = crate::rng::rng(11);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                // Row-major storage with padded row strides, as the views of a workspace.
                let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                let (lda, ldb, ldc) = (a_cols + 2, b_cols + 1, n + 3);
                let a = crate::rng::random_matrix(&mut r, a_rows, lda);
                let b = crate::rng::random_matrix(&mut r, b_rows, ldb);
                let c0 = crate::rng::random_matrix(&mut r, m, ldc);
                let (alpha, beta) = (0.75f32, -0.5f32);
                let mut c = c0.clone();
                let spec = Gemm {
                    trans_a,
                    trans_b,
                    m,
                    n,
                    k,
                    alpha,
                    a: DevPtr::host(&a),
                    lda,
                    b: DevPtr::host(&b),
                    ldb,
                    beta,
                    c: DevPtrMut::host(&mut c),
                    ldc,
                    precision: GemmPrecision::F32,
                };
                spec.check().unwrap();
                let (ai, bi): (Vec<_>, Vec<_>) = (0..m * k)
                    .map(|x| (spec.a_index(x / k, x % k), spec.b_index(x % k, x / k % n)))
                    .unzip();
                let cfg =
                    cublas_config(trans_a, trans_b, (m, n, k), alpha, lda, ldb, beta, ldc).unwrap();
                column_major_sgemm(&cfg, &b, &a, &mut c); // operands swapped, as Blas::gemm does
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k)
                            .map(|l| {
                                let a_il = if trans_a {
                                    a[l * lda + i]
                                } else {
                                    a[i * lda + l]
                                };
                                let b_lj = if trans_b {
                                    b[j * ldb + l]
                                } else {
                                    b[l * ldb + j]
                                };
                                f64::from(a_il) * f64::from(b_lj)
                            })
                            .sum();
                        let want =
                            f64::from(alpha) * s + f64::from(beta) * f64::from(c0[i * ldc + j]);
                        let got = f64::from(c[i * ldc + j]);
                        assert!(
                            (got - want).abs() < 1e-5,
                            "trans {trans_a} {trans_b} C[{i}][{j}]: {got} vs {want}"
                        );
                    }
                    // The padding past column n is untouched.
                    assert_eq!(
                        c[i * ldc + n..(i + 1) * ldc],
                        c0[i * ldc + n..(i + 1) * ldc]
                    );
                }
                // The index helpers the emulator's GEMM uses agree with the layout above.
                for (x, (&ia, &ib)) in ai.iter().zip(&bi).enumerate() {
                    let (i, l, j) = (x / k, x % k, x / k % n);
                    let want_a = if trans_a { l * lda + i } else { i * lda + l };
                    let want_b = if trans_b { j * ldb + l } else { l * ldb + j };
                    assert_eq!((ia, ib), (want_a, want_b));
                }
            }
        }
    }

    #[test]
    fn gemm_extents_are_checked() {
        let (a, b) = (vec![0.0f32; 6], vec![0.0f32; 6]);
        let mut c = vec![0.0f32; 3];
        let g = Gemm {
            trans_a: false,
            trans_b: false,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0,
            a: DevPtr::host(&a),
            lda: 3,
            b: DevPtr::host(&b),
            ldb: 2,
            beta: 0.0,
            c: DevPtrMut::host(&mut c),
            ldc: 2,
            precision: GemmPrecision::F32,
        };
        let err = g.check().unwrap_err().to_string();
        assert!(err.contains("GEMM C"), "{err}");
    }
}
