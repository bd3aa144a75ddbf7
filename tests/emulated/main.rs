//! The kernels' own sources on the CPU emulator, and the virtual GPU's own checks on
//! planted bugs.

#[path = "../common/mod.rs"]
mod common;
#[path = "../emulator/mod.rs"]
mod emulator;

mod kernels;
mod virtual_gpu;
