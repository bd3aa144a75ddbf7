//! The encoder's ops, the one list of them: [`Encoder`] (a backend that runs every op the
//! models use) and [`EncoderKernels`] (the CUDA kernel version of each, config.json's
//! `kernels` object and `train --kernels`), both made by one macro from the list below.
//!
//! Adding an op (say `maxpool`): its folder `src/ops/maxpool/` (math, `cpu.rs`, `cuda.rs`,
//! `node.rs` with its device trait for both backends and its `Graph` method) and
//! `kernels/maxpool.cu`, then two lines: `pub mod maxpool;` in `src/ops/mod.rs` and its line
//! here.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, CudaBackend};
use crate::error::{Error, Result};
use crate::loss::node::LossDevice;
use crate::names::Named;
use crate::ops;

macro_rules! encoder_ops {
    ($($op:ident: $device:ident;)+) => {
        /// A backend that runs every op of the encoder (both backends do).
        pub trait Encoder: LossDevice $(+ ops::$op::$device)+ {}
        impl<B: LossDevice $(+ ops::$op::$device)+> Encoder for B {}

        /// The kernel version each encoder op runs on CUDA (the newest by default).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct EncoderKernels {
            $(pub $op: ops::$op::Version,)+
        }

        impl EncoderKernels {
            /// `backend` with these versions as its options.
            pub fn apply(self, backend: CudaBackend) -> CudaBackend {
                backend$(.with_option(self.$op))+
            }

            /// Every op and the names of its versions (the last is the default).
            pub fn versions() -> Vec<(&'static str, Vec<String>)> {
                use clap::ValueEnum;
                vec![$((
                    stringify!($op),
                    ops::$op::Version::value_variants().iter().map(|v| v.name()).collect(),
                ),)+]
            }
        }
    };
}

encoder_ops! {
    conv2d: Conv2dDevice;
    batchnorm: BatchNormDevice;
    elementwise: ElementwiseDevice;
    pool: PoolDevice;
    linear: LinearDevice;
    sgd: SgdDevice;
    topk: NearestDevice;
    normalize_rows: NormalizeDevice;
}

impl std::str::FromStr for EncoderKernels {
    type Err = Error;

    /// `op=version` pairs separated by commas (`conv2d=v1,batchnorm=v1`); ops not named keep
    /// the newest version.
    fn from_str(s: &str) -> Result<Self> {
        let mut map = serde_json::Map::new();
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (op, version) = pair.split_once('=').ok_or_else(|| {
                Error::invalid(format!(
                    "--kernels {pair:?}: expected op=version, e.g. conv2d=v1"
                ))
            })?;
            map.insert(op.trim().into(), version.trim().into());
        }
        serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| Error::invalid(format!("--kernels {}: {e}", crate::error::excerpt(s))))
    }
}
