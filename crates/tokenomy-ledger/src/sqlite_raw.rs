//! The writer's commit-path writes and the indexer's bulk inserts, stepped through SQLite's
//! C API.
//!
//! Why this exists: rusqlite binds every blob and text `SQLITE_TRANSIENT`, so SQLite
//! allocates a copy of each 16-byte id, idempotency key and log leaf, and frees it at the
//! next bind; with rusqlite's checks around every bind, binding was 14 % of the writer
//! thread's instructions per charge (callgrind, `examples/bench_settle`), and the writer
//! thread is the SQLite ledger's ceiling. Here values are bound `SQLITE_STATIC`: SQLite
//! reads them where they are.
//!
//! That is sound only while the bound memory outlives every step that can read it, so
//! binding is not exposed: [`RawStmt::run`] binds all of a statement's parameters from
//! the slice it borrows, steps the statement to its end and resets it before it returns,
//! and no other code steps a [`RawStmt`]. Only statements that return no rows
//! (`INSERT`, `UPDATE`) go through here.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, CStr};
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

use rusqlite::{ffi, Connection};

/// A parameter value, bound in place.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val<'a> {
    Int(i64),
    Blob(&'a [u8]),
    Text(&'a str),
    Null,
}

impl<'a> From<i64> for Val<'a> {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}

impl<'a> From<&'a [u8]> for Val<'a> {
    fn from(v: &'a [u8]) -> Self {
        Val::Blob(v)
    }
}

impl<'a> From<&'a str> for Val<'a> {
    fn from(v: &'a str) -> Self {
        Val::Text(v)
    }
}

impl<'a, T: Into<Val<'a>>> From<Option<T>> for Val<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// One prepared statement that returns no rows, which borrows its connection (`'c`).
pub(crate) struct RawStmt<'c> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    db: *mut ffi::sqlite3,
    params: usize,
    _conn: PhantomData<&'c Connection>,
}

impl<'c> RawStmt<'c> {
    /// Prepares `sql` (one statement) on `conn`.
    pub(crate) fn prepare(conn: &'c Connection, sql: &str) -> rusqlite::Result<RawStmt<'c>> {
        let len = c_len(sql.len())?;
        // SAFETY: `handle` is the connection's open database; SQLite reads `len` bytes of
        // `sql`, which lives through the call, and writes the two out-pointers.
        let db = unsafe { conn.handle() };
        let (mut stmt, mut tail) = (ptr::null_mut(), ptr::null());
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(db, sql.as_ptr().cast::<c_char>(), len, ffi::SQLITE_PREPARE_PERSISTENT, &mut stmt, &mut tail)
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db, rc));
        }
        let stmt = NonNull::new(stmt).ok_or_else(|| misuse("an empty statement"))?;
        let mut raw = RawStmt { stmt, db, params: 0, _conn: PhantomData };
        let used = tail as usize - sql.as_ptr() as usize;
        if !sql[used..].trim().is_empty() {
            return Err(rusqlite::Error::MultipleStatement);
        }
        // SAFETY: `stmt` is a live statement.
        if unsafe { ffi::sqlite3_stmt_readonly(stmt.as_ptr()) } != 0 {
            return Err(misuse("a statement that writes nothing (RawStmt runs INSERT and UPDATE only)"));
        }
        raw.params = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) } as usize;
        Ok(raw)
    }

    /// Binds `vals` to parameters 1.., runs the statement to its end and resets it; returns
    /// the rows it changed. `vals` must name every parameter.
    pub(crate) fn run(&self, vals: &[Val<'_>]) -> rusqlite::Result<usize> {
        assert_eq!(vals.len(), self.params, "a statement got {} values for {} parameters", vals.len(), self.params);
        let s = self.stmt.as_ptr();
        for (i, v) in vals.iter().enumerate() {
            let i = i as c_int + 1;
            // SAFETY: `s` is live; blobs and texts are bound SQLITE_STATIC, and `vals`
            // borrows them until this function returns, after the statement was reset.
            let rc = unsafe {
                match *v {
                    Val::Int(n) => ffi::sqlite3_bind_int64(s, i, n),
                    Val::Null => ffi::sqlite3_bind_null(s, i),
                    Val::Blob(b) => ffi::sqlite3_bind_blob(s, i, b.as_ptr().cast(), c_len(b.len())?, ffi::SQLITE_STATIC()),
                    Val::Text(t) => ffi::sqlite3_bind_text(s, i, t.as_ptr().cast(), c_len(t.len())?, ffi::SQLITE_STATIC()),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(error(self.db, rc));
            }
        }
        // SAFETY: every parameter is bound to memory that outlives this call.
        let rc = unsafe { ffi::sqlite3_step(s) };
        let out = match rc {
            ffi::SQLITE_DONE => Ok(unsafe { ffi::sqlite3_changes64(self.db) } as usize),
            ffi::SQLITE_ROW => Err(rusqlite::Error::ExecuteReturnedResults),
            rc => Err(error(self.db, rc)),
        };
        // SAFETY: `s` is live. (Its result repeats the step's error, already taken.)
        unsafe { ffi::sqlite3_reset(s) };
        out
    }
}

impl Drop for RawStmt<'_> {
    fn drop(&mut self) {
        // SAFETY: the statement is live and dropped once; its connection is still open.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

fn c_len(n: usize) -> rusqlite::Result<c_int> {
    c_int::try_from(n).map_err(|_| rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_TOOBIG), Some(format!("{n} bytes"))))
}

fn misuse(what: &str) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(ffi::Error::new(ffi::SQLITE_MISUSE), Some(what.into()))
}

/// The connection's last error, as rusqlite reports it.
fn error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is an open connection; the message is copied before any other call.
    let msg = unsafe {
        let p = ffi::sqlite3_errmsg(db);
        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
    };
    rusqlite::Error::SqliteFailure(ffi::Error::new(rc), msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch("CREATE TABLE t (a INTEGER NOT NULL, b BLOB, c TEXT, CHECK (a >= 0))").unwrap();
        c
    }

    #[test]
    fn values_are_written_as_bound_and_the_statement_runs_again() {
        let c = conn();
        let s = RawStmt::prepare(&c, "INSERT INTO t (a, b, c) VALUES (?1, ?2, ?3)").unwrap();
        for i in 0..3i64 {
            let blob = i.to_be_bytes();
            let text = format!("key-{i}");
            assert_eq!(s.run(&[i.into(), Val::Blob(&blob), Val::Text(&text)]).unwrap(), 1);
        }
        assert_eq!(s.run(&[7.into(), Val::Null, None::<&str>.into()]).unwrap(), 1);
        let rows: Vec<(i64, Option<Vec<u8>>, Option<String>)> = c
            .prepare("SELECT a, b, c FROM t ORDER BY rowid")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows[1], (1, Some(1i64.to_be_bytes().to_vec()), Some("key-1".into())));
        assert_eq!(rows[3], (7, None, None));
        let u = RawStmt::prepare(&c, "UPDATE t SET a = a + 10 WHERE a < ?1").unwrap();
        assert_eq!(u.run(&[2.into()]).unwrap(), 2);
    }

    #[test]
    fn a_failed_step_is_an_error_and_leaves_the_statement_usable() {
        let c = conn();
        let s = RawStmt::prepare(&c, "INSERT INTO t (a) VALUES (?1)").unwrap();
        let e = s.run(&[(-1).into()]).unwrap_err();
        assert!(e.to_string().contains("CHECK constraint failed"), "{e}");
        assert_eq!(s.run(&[1.into()]).unwrap(), 1);
    }

    #[test]
    fn only_one_writing_statement_is_accepted() {
        let c = conn();
        assert!(RawStmt::prepare(&c, "INSERT INTO t (a) VALUES (1); INSERT INTO t (a) VALUES (2)").is_err());
        let e = RawStmt::prepare(&c, "SELECT a FROM t").err().unwrap();
        assert!(e.to_string().contains("writes nothing"), "{e}");
        assert!(RawStmt::prepare(&c, "  ").err().unwrap().to_string().contains("empty"));
        assert!(RawStmt::prepare(&c, "INSERT INTO nowhere VALUES (1)").is_err());
    }

    #[test]
    #[should_panic(expected = "values for 2 parameters")]
    fn every_parameter_must_be_given() {
        let c = conn();
        RawStmt::prepare(&c, "INSERT INTO t (a, c) VALUES (?1, ?2)").unwrap().run(&[1.into()]).unwrap();
    }
}
