//! The Tapline provisioning station: profiles, firmware releases, the
//! per-card recipe, reader workers and batches, the ledger, the emulated
//! line. The `station` binary is a thin CLI over this library.

pub mod batch;
pub mod control;
pub mod daemon;
pub mod dash;
pub mod doctor;
pub mod firmware;
pub mod fixture;
pub mod gp_tool;
pub mod handler;
pub mod http;
pub mod ledger;
pub mod live;
pub mod metrics;
pub mod pairing;
pub mod profile;
pub mod recipe;
pub mod report;
pub mod signals;
pub mod sim;
pub mod state;
pub mod worker;
pub mod yaml;
