//! One error type for the whole crate: an errno for FUSE, a context string for the CLI.

use std::fmt;
use std::io;

#[derive(Debug)]
pub struct Error {
    errno: i32,
    context: String,
    /// A CLI message that stands on its own (no OS reason to append).
    message_only: bool,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(errno: i32) -> Self {
        Error {
            errno,
            context: String::new(),
            message_only: false,
        }
    }

    /// An error for the CLI: a message, with EINVAL as its errno.
    pub fn msg(message: impl Into<String>) -> Self {
        Error {
            errno: libc::EINVAL,
            context: message.into(),
            message_only: true,
        }
    }

    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// Prefix what was being done (a path, an option) for the one-line CLI message.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.context = if self.context.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {}", self.context)
        };
        self
    }

    /// Context for an error that has none yet (a bare OS error); a message that already
    /// says what it is about stays as it is.
    pub fn or_context(self, what: impl fmt::Display) -> Self {
        if self.context.is_empty() {
            self.context(what)
        } else {
            self
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::new(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = io::Error::from_raw_os_error(self.errno).to_string();
        // Strip " (os error N)" which says nothing to a user.
        let reason = reason
            .split(" (os error")
            .next()
            .unwrap_or(&reason)
            .to_string();
        if self.context.is_empty() {
            write!(f, "{reason}")
        } else if self.message_only {
            write!(f, "{}", self.context)
        } else {
            write!(f, "{}: {reason}", self.context)
        }
    }
}

impl std::error::Error for Error {}

/// `s` fit for a one-line message: control characters (a newline in a file name) escaped.
pub fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Shorthand: `Err(err(libc::ENOENT))`.
pub fn err(errno: i32) -> Error {
    Error::new(errno)
}

/// Attach context to io results.
pub trait Context<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| Error::from(e).context(what))
    }
}

impl<T> Context<T> for Result<T> {
    fn ctx(self, what: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.context(what))
    }
}
