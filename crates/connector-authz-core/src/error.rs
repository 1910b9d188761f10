use std::fmt;
use std::path::{Path, PathBuf};

/// A configuration problem, located in its file and said so that a person can fix it:
/// `route "/ai/v2/code/" requires unknown unit primitive "code_sugestions" (config/connector-authz.yaml:14)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, 0 when the problem is the file as a whole.
    pub line: u32,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl AsRef<Path>, line: u32, message: impl Into<String>) -> Self {
        Self {
            file: file.as_ref().to_path_buf(),
            line,
            message: message.into(),
        }
    }

    /// Turns a serde-saphyr parse error into a located one.
    pub fn from_yaml(file: impl AsRef<Path>, err: &serde_saphyr::Error) -> Self {
        let line = err.location().map(|l| l.line() as u32).unwrap_or(0);
        let message = err.to_string();
        Self::new(file, line, message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{} ({}:{})",
                self.message,
                self.file.display(),
                self.line
            )
        } else {
            write!(f, "{} ({})", self.message, self.file.display())
        }
    }
}

impl std::error::Error for ConfigError {}
