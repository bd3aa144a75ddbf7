//! The one registry of the instance loss's implementations: every version's name, device,
//! arithmetic, whether it selects hard/easy negatives and whether it stores N x N matrices.
//! The command line's values (`--loss` of `train`, `loss`, `bench-loss`, `bench-train`),
//! config.json's names, the benchmarks' rows and every test's list of versions come from
//! [`REGISTRY`]; a version added here (and to its enum, whose `match`es then fail to compile
//! until it is launched) reaches all of them.
//!
//! | name | device | arithmetic | hard/easy | N x N stored |
//! |---|---|---|---|---|
//! | `reference` | CPU | float64, plain loops | yes | the gradient's coefficients |
//! | `fused` | CPU | float32 (SIMD exp/ln, GEMM), float64 row sums | yes | no |
//! | `fused-f64` | CPU | float64 | yes | no |
//! | `unfused` | CUDA | float32, own tiled matmul | yes | S, E, G |
//! | `unfused-cublas` | CUDA | float32, cuBLAS SGEMM | yes | S, E, G |
//! | `fused-v1` | CUDA | float32, one block per row | no | no |
//! | `fused-v2` | CUDA | float32, tiled | no | no |
//! | `fused-v3-tf32` | CUDA | TF32 tensor cores, float32 sums | yes | no |
//! | `fused-v3-bf16` | CUDA | bf16 tensor cores, float32 sums | yes | no |
//!
//! Every version computes both gradient semantics.

use super::{GradSemantics, LossConfig, Negatives};
use crate::error::{Error, Result};
use crate::names::{Device, Named};

/// The CPU implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuLossVersion {
    /// The float64 reference (`loss::reference`).
    Reference,
    /// The fused CPU loss in the backend's precision (`loss::cpu`), the CPU's training loss.
    #[default]
    Fused,
    /// The fused CPU loss in float64.
    FusedF64,
}

/// The GPU implementations, oldest first (`loss::cuda`, a file each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CudaLossVersion {
    /// One kernel per step, N x N matrices stored, own tiled matmul.
    Unfused,
    /// One kernel per step, N x N matrices stored, cuBLAS SGEMM.
    UnfusedCublas,
    /// Fused, one block per row, three sweeps recomputing dot products.
    FusedV1,
    /// Fused, tiled, O(N) extra memory, at most 3 launches.
    #[default]
    FusedV2,
    /// Fused v2's sweeps on tensor cores, TF32 operands, float32 accumulation.
    FusedV3Tf32,
    /// Fused v2's sweeps on tensor cores, bf16 operands, float32 accumulation.
    FusedV3Bf16,
}

/// Any implementation of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossVersion {
    Cpu(CpuLossVersion),
    Cuda(CudaLossVersion),
}

/// How a version multiplies and sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arithmetic {
    F64,
    F32,
    /// Products of TF32-rounded operands (relative rounding 2^-11), float32 sums.
    Tf32,
    /// Products of bf16-rounded operands (2^-9), float32 sums.
    Bf16,
}

/// One row of the registry.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub version: LossVersion,
    /// The name in flags, tables and config.json.
    pub name: &'static str,
    pub arithmetic: Arithmetic,
    /// Whether `--negatives hard|easy` runs in it.
    pub selects: bool,
    /// Whether it stores N x N matrices (memory grows as N^2).
    pub stores_nxn: bool,
    /// What `--help` says of it.
    pub about: &'static str,
}

/// Every version, CPU first, then CUDA oldest first.
pub static REGISTRY: [Entry; 9] = [
    Entry {
        version: LossVersion::Cpu(CpuLossVersion::Reference),
        name: "reference",
        arithmetic: Arithmetic::F64,
        selects: true,
        stores_nxn: true,
        about: "CPU: the float64 reference (plain loops; slow, stores N x N)",
    },
    Entry {
        version: LossVersion::Cpu(CpuLossVersion::Fused),
        name: "fused",
        arithmetic: Arithmetic::F32,
        selects: true,
        stores_nxn: false,
        about: "CPU: the fused loss in float32 (the CPU's default for training)",
    },
    Entry {
        version: LossVersion::Cpu(CpuLossVersion::FusedF64),
        name: "fused-f64",
        arithmetic: Arithmetic::F64,
        selects: true,
        stores_nxn: false,
        about: "CPU: the fused loss in float64 (`loss`'s default: the loss to full accuracy)",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::Unfused),
        name: "unfused",
        arithmetic: Arithmetic::F32,
        selects: true,
        stores_nxn: true,
        about: "CUDA: one kernel per step, N x N stored, own tiled matmul",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::UnfusedCublas),
        name: "unfused-cublas",
        arithmetic: Arithmetic::F32,
        selects: true,
        stores_nxn: true,
        about: "CUDA: the unfused chain with cuBLAS products",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::FusedV1),
        name: "fused-v1",
        arithmetic: Arithmetic::F32,
        selects: false,
        stores_nxn: false,
        about: "CUDA: fused, one block per row",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::FusedV2),
        name: "fused-v2",
        arithmetic: Arithmetic::F32,
        selects: false,
        stores_nxn: false,
        about: "CUDA: fused and tiled, O(N) extra memory (the default on CUDA)",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::FusedV3Tf32),
        name: "fused-v3-tf32",
        arithmetic: Arithmetic::Tf32,
        selects: true,
        stores_nxn: false,
        about: "CUDA: fused v2 on tensor cores, TF32 operands",
    },
    Entry {
        version: LossVersion::Cuda(CudaLossVersion::FusedV3Bf16),
        name: "fused-v3-bf16",
        arithmetic: Arithmetic::Bf16,
        selects: true,
        stores_nxn: false,
        about: "CUDA: fused v2 on tensor cores, bf16 operands",
    },
];

/// A version's bound against the float64 truth ([`LossVersion::tolerance`]): the loss's
/// relative error, and dL/dz's error scaled by row norms (`loss::check::scaled_grad_error`)
/// where one is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    pub loss: f64,
    pub grad: Option<f64>,
}

impl Tolerance {
    /// The larger bound, for a check of both at once (`loss::check::Truth::check`).
    pub fn either(self) -> f64 {
        self.loss.max(self.grad.unwrap_or(self.loss))
    }
}

impl LossVersion {
    /// Every version, in the registry's order.
    pub fn all() -> impl Iterator<Item = LossVersion> {
        REGISTRY.iter().map(|e| e.version)
    }

    /// The versions of one device.
    pub fn on(device: Device) -> impl Iterator<Item = LossVersion> {
        LossVersion::all().filter(move |v| v.device() == device)
    }

    /// This version's row of the registry.
    pub fn entry(self) -> &'static Entry {
        REGISTRY
            .iter()
            .find(|e| e.version == self)
            .unwrap_or(&REGISTRY[0]) // unreachable: every variant has its row (a unit test)
    }

    pub fn device(self) -> Device {
        match self {
            LossVersion::Cpu(_) => Device::Cpu,
            LossVersion::Cuda(_) => Device::Cuda,
        }
    }

    /// A device's default: `fused` on the CPU, `fused-v2` on CUDA.
    pub fn default_on(device: Device) -> LossVersion {
        match device {
            Device::Cpu => LossVersion::Cpu(CpuLossVersion::Fused),
            Device::Cuda => LossVersion::Cuda(CudaLossVersion::FusedV2),
        }
    }

    /// The version on `device`, or an error naming the flag and the versions that run there.
    pub fn for_device(self, device: Device, flag: &str) -> Result<LossVersion> {
        if self.device() == device {
            return Ok(self);
        }
        let there: Vec<String> = LossVersion::on(device).map(|v| v.name()).collect();
        let place = |d: Device| match d {
            Device::Cpu => "the CPU",
            Device::Cuda => "CUDA",
        };
        Err(Error::invalid(format!(
            "{flag} {} runs on {}: add --device {}, or use one of {} on {}",
            self.name(),
            place(self.device()),
            self.device().name(),
            there.join(", "),
            place(device)
        )))
    }

    /// Whether this version computes `cfg` (a hard/easy selection runs in some versions only).
    pub fn supports(self, cfg: &LossConfig) -> Result<()> {
        if cfg.negatives == Negatives::All || self.entry().selects {
            return Ok(());
        }
        let selecting: Vec<String> = LossVersion::all()
            .filter(|v| v.entry().selects)
            .map(|v| v.name())
            .collect();
        Err(Error::invalid(format!(
            "--negatives hard|easy: --loss {} has no selection of negatives; it runs in {}",
            self.name(),
            selecting.join(", ")
        )))
    }

    /// How close this version must come to the float64 truth, for `tau`, `d` and random or
    /// adversarial (near-duplicate) inputs; the tests' and `bench-loss`'s bound.
    ///
    /// float64: 1e-6 (its dL/dz is checked as float32, which rounds it by 2^-24; the loss
    /// itself agrees to about 1e-12). float32 on the CPU: 5e-5, and 1e-4 on adversarial inputs (near-duplicate
    /// rows make dL/df_a almost parallel to f_a, and the normalization backward's projection
    /// cancels in float32); on CUDA 5e-5 and 2e-4. The tensor-core versions round every
    /// similarity's operands (relative u: 2^-11 TF32, 2^-9 bf16), so each exponent (s - 1)/tau
    /// carries about u/tau: the loss, an average over rows, stays within the bounds the GPU
    /// issue set (TF32 3e-4, bf16 1e-2) everywhere, and so does the gradient at tau >= 0.1;
    /// below, the gradient's bound grows as (0.1 / tau)^2 (measured on the emulator at
    /// tau = 0.05: TF32 6.2e-4, bf16 6.7e-3 at worst). Below d = 64 a similarity's rounding
    /// averages over fewer terms: the gradient's bound is 4x (TF32 measured up to 6e-4 at d = 3
    /// at every tau, 3.2e-4 at d = 16 and tau = 0.1); in fewer than 16 dimensions
    /// near-duplicate rows, where a close neighbour's exponent moves by u/tau, have a bound on
    /// the loss only.
    pub fn tolerance(self, tau: f64, d: usize, adversarial: bool) -> Tolerance {
        let both = |t: f64| Tolerance {
            loss: t,
            grad: Some(t),
        };
        let loss = match (self.entry().arithmetic, self.device()) {
            (Arithmetic::F64, _) => return both(1e-6),
            (Arithmetic::F32, Device::Cpu) => return both(if adversarial { 1e-4 } else { 5e-5 }),
            (Arithmetic::F32, Device::Cuda) => return both(if adversarial { 2e-4 } else { 5e-5 }),
            (Arithmetic::Tf32, _) => 3e-4,
            (Arithmetic::Bf16, _) => 1e-2,
        };
        let small_d = if d < 64 { 4.0 } else { 1.0 };
        let grad = loss * (0.1 / tau).max(1.0).powi(2) * small_d;
        Tolerance {
            loss,
            grad: (!(adversarial && d < 16)).then_some(grad),
        }
    }
}

impl CudaLossVersion {
    /// Every GPU version, oldest first (the registry's CUDA rows).
    pub fn all() -> impl Iterator<Item = CudaLossVersion> {
        LossVersion::all().filter_map(|v| match v {
            LossVersion::Cuda(c) => Some(c),
            LossVersion::Cpu(_) => None,
        })
    }

    /// As a [`LossVersion`].
    pub fn version(self) -> LossVersion {
        LossVersion::Cuda(self)
    }

    /// Whether the version runs a hard/easy selection over recomputed tiles (O(N) scratch)
    /// rather than over stored N x N exponentials.
    pub fn selects_in_tiles(self) -> bool {
        let e = self.version().entry();
        e.selects && !e.stores_nxn
    }

    /// Whether the version stores N x N matrices.
    pub fn stores_nxn(self) -> bool {
        self.version().entry().stores_nxn
    }

    /// See [`LossVersion::tolerance`].
    pub fn tolerance(self, tau: f64, d: usize, adversarial: bool) -> Tolerance {
        self.version().tolerance(tau, d, adversarial)
    }

    /// Kernel launches of one call (forward, plus backward when `with_grad`).
    pub fn launches(self, cfg: &LossConfig, with_grad: bool) -> usize {
        let both = (with_grad && cfg.semantics == GradSemantics::BothSides) as usize;
        let selects = (cfg.negatives != Negatives::All) as usize;
        match self {
            CudaLossVersion::Unfused | CudaLossVersion::UnfusedCublas => {
                6 + selects + if with_grad { 3 + both } else { 0 }
            }
            CudaLossVersion::FusedV1 => 3 + if with_grad { 1 + both } else { 0 },
            CudaLossVersion::FusedV2 => 2 + both,
            CudaLossVersion::FusedV3Tf32 | CudaLossVersion::FusedV3Bf16 => 2 + selects + both,
        }
    }
}

impl CpuLossVersion {
    /// Every CPU version (the registry's CPU rows).
    pub fn all() -> impl Iterator<Item = CpuLossVersion> {
        LossVersion::all().filter_map(|v| match v {
            LossVersion::Cpu(c) => Some(c),
            LossVersion::Cuda(_) => None,
        })
    }

    /// As a [`LossVersion`].
    pub fn version(self) -> LossVersion {
        LossVersion::Cpu(self)
    }
}

/// `clap::ValueEnum` from the registry's names, for a version type (the names are the
/// registry's alone: [`Named`], config.json and `--help` all read them there).
macro_rules! value_enum_from_registry {
    ($t:ty, $variants:expr, $as_version:expr) => {
        impl clap::ValueEnum for $t {
            fn value_variants<'a>() -> &'a [Self] {
                static VARIANTS: std::sync::OnceLock<Vec<$t>> = std::sync::OnceLock::new();
                VARIANTS.get_or_init(|| $variants.collect())
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                let entry = ($as_version)(*self).entry();
                Some(clap::builder::PossibleValue::new(entry.name).help(entry.about))
            }
        }
        crate::serde_by_name!($t);
    };
}

value_enum_from_registry!(LossVersion, LossVersion::all(), |v: LossVersion| v);
value_enum_from_registry!(
    CudaLossVersion,
    CudaLossVersion::all(),
    |v: CudaLossVersion| v.version()
);
value_enum_from_registry!(
    CpuLossVersion,
    CpuLossVersion::all(),
    |v: CpuLossVersion| v.version()
);

impl std::fmt::Display for LossVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.entry().name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_has_one_row_and_names_round_trip() {
        use clap::ValueEnum;
        let mut names: Vec<&str> = REGISTRY.iter().map(|e| e.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len(), "a name is used twice");
        for e in &REGISTRY {
            assert!(std::ptr::eq(e.version.entry(), e), "{} has no row", e.name);
            let back = LossVersion::from_str(e.name, false).unwrap();
            assert_eq!(back, e.version);
            assert_eq!(back.name(), e.name);
        }
        let cuda: Vec<CudaLossVersion> = CudaLossVersion::all().collect();
        assert_eq!(cuda.len(), 6);
        assert_eq!(CudaLossVersion::value_variants(), &cuda[..]);
        assert_eq!(
            serde_json::to_string(&CudaLossVersion::FusedV3Bf16).unwrap(),
            "\"fused-v3-bf16\""
        );
        assert_eq!(LossVersion::default_on(Device::Cuda).name(), "fused-v2");
        let err = LossVersion::Cuda(CudaLossVersion::FusedV1)
            .for_device(Device::Cpu, "--loss")
            .unwrap_err()
            .to_string();
        assert!(err.contains("reference, fused, fused-f64"), "{err}");
    }
}
