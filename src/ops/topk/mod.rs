//! The kNN search: for each query row (L2-normalized, d wide) its k most similar rows of a
//! bank by dot product, as (similarity, index) best first, ties to the lower index. Both
//! devices form the similarities with a GEMM per block of queries and select from each row.

pub mod cpu;
pub mod cuda;
pub mod device;

pub use device::NearestDevice;

/// For each query, its neighbours as (similarity, index), best first.
pub type Neighbours = Vec<Vec<(f32, usize)>>;

/// Best first, ties to the lower index.
pub fn by_similarity(a: &(f32, usize), b: &(f32, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The CUDA kernel versions of the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Version {
    /// A float32 GEMM per block of queries, then topk_rows_v1 (radix select, a block a row).
    #[default]
    V1,
}
crate::serde_by_name!(Version);
