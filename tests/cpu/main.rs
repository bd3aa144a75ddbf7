//! Library tests that need no GPU and no binary of their own: references, CPU paths, the
//! graph, methods, the source tree's layout.

#[path = "../common/mod.rs"]
mod common;

mod conv_versions;
mod cpu_loss;
mod gathered_loss;
mod kmeans_sklearn;
mod layout;
mod methods;
mod negative_selection;
mod nn;
mod reference_loss;
mod rendezvous;
