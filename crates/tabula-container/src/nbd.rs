//! Remote containers: an NBD export reached through a small pool of blocking connections.
//!
//! Each call takes an idle connection (or opens one, up to [`MAX_CONNECTIONS`], or waits for
//! one) and gives it back afterwards. A connection that fails (EOF, reset, timeout) is
//! dropped together with every idle one (they went to the same server, which most likely
//! went away), so the next call reconnects: that is how I/O resumes after the server comes
//! back, with nothing to restart. A call that fails on a reused connection because the
//! server closed it is retried once on a new connection, so a server restart between two
//! calls costs no error.
//!
//! Durability: `sync` is an NBD flush. With `NBD_FLAG_CAN_MULTI_CONN` one flush covers every
//! connection; without it the pool keeps a single connection so that it still does. If a
//! connection that carried writes not yet flushed fails, those writes may be lost with the
//! server's cache: the next `sync` reports that once, as an error, rather than claim
//! durability it cannot know.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use tabula_nbd::client::{ClientOptions, Connection, NbdUri};

use crate::{ContainerError, ContainerOptions, write_zeros_with};

/// Connections per remote container when the server allows several.
pub(crate) const MAX_CONNECTIONS: usize = 8;

pub(crate) struct Remote {
    uri: NbdUri,
    opts: ClientOptions,
    size: u64,
    max_connections: usize,
    write_zeroes: bool,
    pool: Mutex<Pool>,
    returned: Condvar,
    /// Flushes started so far; a write records the count when it completes.
    flushes_started: AtomicU64,
    /// Highest flush number known complete: covers every write that completed while
    /// `flushes_started` was below it.
    flushed_upto: AtomicU64,
    /// A connection carrying unflushed writes failed since the last `sync`.
    lost_writes: AtomicBool,
}

struct Pool {
    idle: Vec<Conn>,
    /// Connections open, idle or in use.
    open: usize,
    /// Bumped when a connection fails; connections from before are not reused.
    generation: u64,
}

struct Conn {
    c: Connection,
    /// `flushes_started` when its last write completed, if it has written.
    last_write: Option<u64>,
}

/// A connection taken from the pool; given back (or dropped if it failed) on drop.
struct Lease<'a> {
    remote: &'a Remote,
    conn: Option<Conn>,
    generation: u64,
    reused: bool,
}

impl Lease<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let r = self.remote;
        let mut discard = Vec::new();
        {
            let mut pool = r.lock();
            if conn.c.is_broken() {
                if conn
                    .last_write
                    .is_some_and(|w| r.flushed_upto.load(Ordering::SeqCst) <= w)
                {
                    r.lost_writes.store(true, Ordering::SeqCst);
                }
                if self.generation == pool.generation {
                    pool.generation += 1;
                    discard = std::mem::take(&mut pool.idle);
                    pool.open -= discard.len();
                }
                pool.open -= 1;
                discard.push(conn);
            } else if self.generation != pool.generation {
                pool.open -= 1;
                discard.push(conn);
            } else {
                pool.idle.push(conn);
            }
        }
        r.returned.notify_all();
        // Outside the lock: dropping sends a disconnect, bounded by the socket timeout.
        for c in discard {
            if c.last_write
                .is_some_and(|w| r.flushed_upto.load(Ordering::SeqCst) <= w)
            {
                r.lost_writes.store(true, Ordering::SeqCst);
            }
            drop(c);
        }
    }
}

/// Errors that mean "the server closed or reset this connection": a reused connection
/// failing like that is stale, and the call is worth one retry on a new one.
fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotConnected
    )
}

impl Remote {
    pub(crate) fn open(
        uri: &NbdUri,
        expected_size: u64,
        opts: &ContainerOptions,
    ) -> Result<Remote, ContainerError> {
        let client = ClientOptions {
            timeout: opts.io_timeout,
        };
        let c = Connection::connect(uri, &client).map_err(|source| ContainerError::Remote {
            uri: uri.to_string(),
            source,
        })?;
        if c.is_read_only() {
            return Err(ContainerError::ReadOnly {
                uri: uri.to_string(),
            });
        }
        if c.size() < expected_size {
            return Err(ContainerError::TooSmall {
                path: uri.to_string().into(),
                actual: c.size(),
                expected: expected_size,
            });
        }
        let max_connections = if c.can_multi_conn() {
            MAX_CONNECTIONS
        } else {
            1
        };
        Ok(Remote {
            uri: uri.clone(),
            opts: client,
            size: c.size(),
            max_connections,
            write_zeroes: c.can_write_zeroes(),
            pool: Mutex::new(Pool {
                idle: vec![Conn {
                    c,
                    last_write: None,
                }],
                open: 1,
                generation: 0,
            }),
            returned: Condvar::new(),
            flushes_started: AtomicU64::new(0),
            flushed_upto: AtomicU64::new(0),
            lost_writes: AtomicBool::new(false),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    #[cfg(test)]
    pub(crate) fn open_connections(&self) -> usize {
        self.lock().open
    }

    fn lock(&self) -> MutexGuard<'_, Pool> {
        // The pool's state stays consistent across a panic in a caller's I/O.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection to the same export, which must still be writable and big enough.
    fn connect(&self) -> io::Result<Connection> {
        let c = Connection::connect(&self.uri, &self.opts).map_err(|e| {
            let e = io::Error::from(e);
            io::Error::new(e.kind(), format!("NBD container {}: {e}", self.uri))
        })?;
        if c.is_read_only() || c.size() < self.size {
            return Err(io::Error::other(format!(
                "NBD container {} changed: it is now {}{} bytes (was {} bytes, writable)",
                self.uri,
                if c.is_read_only() { "read-only, " } else { "" },
                c.size(),
                self.size
            )));
        }
        Ok(c)
    }

    fn take(&self) -> io::Result<Lease<'_>> {
        let deadline = Instant::now() + self.opts.timeout;
        let mut pool = self.lock();
        loop {
            if let Some(conn) = pool.idle.pop() {
                return Ok(Lease {
                    remote: self,
                    conn: Some(conn),
                    generation: pool.generation,
                    reused: true,
                });
            }
            if pool.open < self.max_connections {
                pool.open += 1;
                let generation = pool.generation;
                drop(pool);
                return match self.connect() {
                    Ok(c) => Ok(Lease {
                        remote: self,
                        conn: Some(Conn {
                            c,
                            last_write: None,
                        }),
                        generation,
                        reused: false,
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.returned.notify_one();
                        Err(e)
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "all {} connections to NBD container {} stayed busy for {:?}",
                        self.max_connections, self.uri, self.opts.timeout
                    ),
                ));
            }
            pool = self
                .returned
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `op` on a pooled connection, retrying once on a new connection if a reused
    /// one turns out to be closed by the server.
    fn run<T>(
        &self,
        writes: bool,
        mut op: impl FnMut(&mut Connection) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut lease = self.take()?;
        let r = op(&mut lease.conn().c);
        let r = match r {
            Err(e) if lease.reused && lease.conn().c.is_broken() && is_stale(&e) => {
                drop(lease);
                lease = self.take()?;
                op(&mut lease.conn().c)
            }
            r => r,
        };
        if writes && r.is_ok() {
            lease.conn().last_write = Some(self.flushes_started.load(Ordering::SeqCst));
        }
        r
    }

    pub(crate) fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.run(false, |c| c.read(offset, buf))
    }

    pub(crate) fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.run(true, |c| c.write(offset, buf, false))
    }

    pub(crate) fn write_at_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.run(true, |c| c.write(offset, buf, true))
    }

    pub(crate) fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.write_zeroes {
            return self.run(true, |c| c.write_zeroes(offset, len, false));
        }
        write_zeros_with(offset, len, |buf, pos| self.write_at(buf, pos))
    }

    pub(crate) fn sync(&self) -> io::Result<()> {
        let id = self.flushes_started.fetch_add(1, Ordering::SeqCst) + 1;
        self.run(false, |c| c.flush())?;
        self.flushed_upto.fetch_max(id, Ordering::SeqCst);
        if self.lost_writes.swap(false, Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "a connection to NBD container {} failed while it carried writes not yet flushed; \
                 the server may have lost them",
                self.uri
            )));
        }
        Ok(())
    }
}
