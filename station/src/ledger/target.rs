//! Where a ledger lives: a SQLite file (the default, one station) or a
//! PostgreSQL database (a line of stations). `--ledger` takes either; a
//! value starting `postgres://` or `postgresql://` is PostgreSQL.

use std::path::{Path, PathBuf};

use super::LedgerError;

#[derive(Clone, PartialEq, Eq)]
pub enum LedgerTarget {
    Sqlite(PathBuf),
    /// A libpq-style URL, e.g. postgres://tapline@db.line/tapline.
    Postgres(String),
}

impl LedgerTarget {
    pub fn parse(spec: &str) -> Result<Self, String> {
        let s = spec.trim();
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            s.parse::<postgres::Config>().map_err(|e| format!("ledger {}: {e}", redact(s)))?;
            Ok(Self::Postgres(s.to_string()))
        } else if s.is_empty() {
            Err("ledger: give a SQLite file or a postgres:// URL".into())
        } else {
            Ok(Self::Sqlite(PathBuf::from(s)))
        }
    }

    /// For messages: the file, or the URL without its password.
    pub fn where_(&self) -> PathBuf {
        match self {
            Self::Sqlite(p) => p.clone(),
            Self::Postgres(url) => PathBuf::from(redact(url)),
        }
    }

    /// A SQLite file the read-side code (export, reports) can read: the file
    /// itself, or for PostgreSQL a snapshot of the shared ledger copied into
    /// a temporary file (removed when the copy is dropped).
    pub fn readable(&self) -> Result<ReadCopy, LedgerError> {
        match self {
            Self::Sqlite(p) => Ok(ReadCopy { path: p.clone(), temporary: false }),
            Self::Postgres(url) => super::sync::snapshot(url),
        }
    }
}

impl std::fmt::Debug for LedgerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self)
    }
}

impl std::fmt::Display for LedgerTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.where_().display())
    }
}

impl std::str::FromStr for LedgerTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

/// A readable SQLite copy of a ledger (see [`LedgerTarget::readable`]).
pub struct ReadCopy {
    path: PathBuf,
    temporary: bool,
}

impl ReadCopy {
    pub(crate) fn temporary(path: PathBuf) -> Self {
        Self { path, temporary: true }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ReadCopy {
    fn drop(&mut self) {
        if self.temporary {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", self.path.display()));
            }
        }
    }
}

/// The URL with any password replaced by `***` (passwords never reach logs).
pub fn redact(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = url[..scheme_end + 3].to_string();
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.find(':') {
                Some(colon) => out.push_str(&format!("{}:***", &userinfo[..colon])),
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    let tail = &rest[authority_end..];
    // A password given as a query parameter.
    match tail.find("password=") {
        Some(p) => {
            let end = tail[p..].find('&').map_or(tail.len(), |e| p + e);
            out.push_str(&tail[..p]);
            out.push_str("password=***");
            out.push_str(&tail[end..]);
        }
        None => out.push_str(tail),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postgres_url_is_told_from_a_file_and_its_password_never_shows() {
        let t = LedgerTarget::parse("postgres://tap:s3cret@db:5432/line?sslmode=disable&password=x2").expect("url");
        assert!(matches!(t, LedgerTarget::Postgres(_)));
        let shown = t.to_string();
        assert_eq!(shown, "postgres://tap:***@db:5432/line?sslmode=disable&password=***");
        assert!(!format!("{t:?}").contains("s3cret"));
        assert_eq!(LedgerTarget::parse("l.db").expect("file"), LedgerTarget::Sqlite("l.db".into()));
        assert!(LedgerTarget::parse("postgres://h:notaport/db").is_err());
    }
}
