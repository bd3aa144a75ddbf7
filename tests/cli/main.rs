//! The `invaspread` binary end to end on the CPU: training, evaluation, careless and hostile
//! input, signals, crashes.

#[path = "../common/mod.rs"]
mod common;

mod careless;
mod crash;
mod data_hostile;
mod data_train;
mod loss;
mod signals;
mod train;
