//! What every natter role needs at run time: configuration ([`config`]),
//! message ids ([`ids`]), telemetry ([`telemetry`], [`process`]) and
//! shutdown ([`shutdown`]). It knows nothing of frames, storage or sockets.

pub mod config;
pub mod discovery;
pub mod ids;
pub mod limit;
pub mod private;
pub mod process;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use shutdown::Shutdown;
