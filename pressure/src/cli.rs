//! The `natter pressure` subcommands.

#[derive(clap::Subcommand)]
pub enum PressureCommand {}

pub fn main(command: PressureCommand) -> anyhow::Result<()> {
    match command {}
}
