//! `rig`: the Tapline lab rig's command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rig", version, about = "Tapline hardware-in-the-loop rig")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the demo wallet firmware's CAP file (deterministic).
    MakeDemoCap {
        #[arg(long)]
        out: PathBuf,
        /// Package version MAJOR.MINOR.
        #[arg(long, default_value = "1.0")]
        version: String,
        /// Load file size in bytes (without Descriptor).
        #[arg(long, default_value_t = rig::DEMO_CODE_SIZE)]
        size: usize,
    },
    /// Print the DEMO ONLY vendor CA public key the emulated chips chain to.
    DemoCa,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::MakeDemoCap { out, version, size } => {
            let (major, minor) = version
                .split_once('.')
                .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                .with_context(|| format!("--version {version:?}: expected MAJOR.MINOR"))?;
            let cap = rig::demo_wallet_cap((major, minor), size)?;
            std::fs::write(&out, &cap).with_context(|| format!("writing {}", out.display()))?;
            println!("{}: {} bytes", out.display(), cap.len());
        }
        Command::DemoCa => {
            println!(
                "{}",
                hex::encode_upper(card::wallet::public_key_bytes(&card::emu::factory::demo_vendor_ca_public()))
            );
        }
    }
    Ok(())
}
