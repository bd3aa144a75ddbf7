//! Operations with a CPU implementation and a CUDA launcher side by side, one file per op.

pub mod normalize_rows;
