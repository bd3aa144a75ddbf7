//! Every GPU test: on a real GPU, or on the virtual GPU with `INVASPREAD_GPU=virtual`; each
//! prints `SKIPPED (no GPU): <name>` without one and fails instead under `REQUIRE_GPU=1`.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod dist;
mod loss;
mod nn;
mod normalize;
mod train_ranks;
