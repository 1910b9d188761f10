mod error; pub use error::ConfigError;
