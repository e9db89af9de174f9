//! Feeds arbitrary bytes as the server's side of a connection to the blocking NBD client:
//! the handshake, then replies to a few commands. The client must never panic, hang or
//! allocate without bound (option replies are capped, reads land in our own buffers).
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use tabula_nbd::client::Connection;

/// Reads come from the fuzz input (then EOF); writes are discarded.
struct Server<'a> {
    input: &'a [u8],
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut c) = Connection::handshake(Server { input: data }, "disk") else {
        return;
    };
    let size = c.size();
    let mut buf = vec![0u8; 8192];
    let _ = c.read(0, &mut buf);
    let _ = c.read(size.saturating_sub(512), &mut buf[..512]);
    let _ = c.write(4096, &buf[..4096], true);
    let _ = c.flush();
    let _ = c.trim(0, size.min(1 << 20));
    let _ = c.write_zeroes(0, size.min(1 << 20), true);
    let _ = c.read(0, &mut buf);
});
