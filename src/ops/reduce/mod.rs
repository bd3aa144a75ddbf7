//! Deterministic reductions on the GPU: the mean of N float64 values in a fixed order (the
//! loss's row terms into the loss, for the unfused chain and fused v1). The CPU paths sum in
//! their own fixed order where they need it.

pub mod cuda;
