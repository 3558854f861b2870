//! The Tapline provisioning station: profiles, firmware releases, the
//! per-card recipe, reader workers and batches, the ledger, the emulated
//! line. The `station` binary is a thin CLI over this library.

pub mod batch;
pub mod doctor;
pub mod firmware;
pub mod gp_tool;
pub mod handler;
pub mod ledger;
pub mod pairing;
pub mod profile;
pub mod recipe;
pub mod report;
pub mod sim;
pub mod worker;
