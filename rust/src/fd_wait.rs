//! Waiting for a socket to become readable with microsecond precision.
//!
//! The Redis lane reads a pick's reply right after sending it, for a few hundred microseconds,
//! instead of going back to the event loop and waiting its turn there (under load a loop pass
//! costs milliseconds at p99). Python's `select.poll`/`epoll` round timeouts up to whole
//! milliseconds, and `select.select` fails on descriptors past 1023; `ppoll` has neither limit.
#![allow(unsafe_code)] // One `ppoll` call on a caller-owned descriptor; see `wait_readable`.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

/// Waits until `fd` is readable (or at end of file / in error, which a read then reports), at
/// most `timeout`. Returns whether it is. An interrupted wait counts as not ready: the caller
/// falls back to its event loop, which retries on its own.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let limit = libc::timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    // SAFETY: `poll` and `limit` are valid for the call's duration; one entry, no signal mask.
    let ready = unsafe { libc::ppoll(&raw mut poll, 1, &raw const limit, std::ptr::null()) };
    if ready < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::Interrupted {
            Ok(false)
        } else {
            Err(error)
        };
    }
    if ready > 0 && poll.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(ready > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    #[test]
    fn times_out_when_nothing_arrives() {
        let (a, _b) = UnixStream::pair().unwrap();
        let started = Instant::now();
        assert!(!wait_readable(a.as_raw_fd(), Duration::from_micros(300)).unwrap());
        assert!(started.elapsed() >= Duration::from_micros(300));
    }

    #[test]
    fn ready_when_data_is_waiting() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"+OK\r\n").unwrap();
        assert!(wait_readable(a.as_raw_fd(), Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn ready_at_end_of_file() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        assert!(wait_readable(a.as_raw_fd(), Duration::from_secs(5)).unwrap());
    }

    #[test]
    fn wakes_when_data_arrives_during_the_wait() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.write_all(b"+OK\r\n").unwrap();
            b
        });
        let started = Instant::now();
        assert!(wait_readable(a.as_raw_fd(), Duration::from_secs(5)).unwrap());
        assert!(started.elapsed() < Duration::from_secs(4));
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_negative_descriptor_is_an_error() {
        assert!(wait_readable(-1, Duration::from_micros(10)).is_err());
    }
}
