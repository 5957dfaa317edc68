//! The agent as a library: a staged pipeline of capture (kernel -> ring
//! buffer -> ordered chunks) and the tools built on it (`dump`).

pub mod capture;
pub mod cli;
pub mod dump;
