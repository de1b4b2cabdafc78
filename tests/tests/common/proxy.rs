//! A TCP proxy the tests put between sites, to cut a link (existing
//! connections dropped, new ones refused) or stall it, and restore it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TCP proxy between two sites that can be cut (existing
/// connections dropped, new ones refused) and restored.
pub struct Proxy {
    pub port: u16,
    pub cut: Arc<AtomicBool>,
    /// Connections stay open but nothing is forwarded either way.
    pub stall: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    pub fn new(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let stall = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (cut2, stall2, stop2) = (cut.clone(), stall.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        if cut2.load(Ordering::Relaxed) {
                            drop(down);
                            continue;
                        }
                        let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                            continue;
                        };
                        for (mut from, mut to) in [
                            (down.try_clone().unwrap(), up.try_clone().unwrap()),
                            (up, down),
                        ] {
                            let (cut3, stall3) = (cut2.clone(), stall2.clone());
                            std::thread::spawn(move || {
                                from.set_read_timeout(Some(Duration::from_millis(100)))
                                    .unwrap();
                                let mut buf = vec![0u8; 64 << 10];
                                loop {
                                    if cut3.load(Ordering::Relaxed) {
                                        let _ = from.shutdown(std::net::Shutdown::Both);
                                        let _ = to.shutdown(std::net::Shutdown::Both);
                                        return;
                                    }
                                    if stall3.load(Ordering::Relaxed) {
                                        std::thread::sleep(Duration::from_millis(50));
                                        continue;
                                    }
                                    match from.read(&mut buf) {
                                        Ok(0) => {
                                            let _ = to.shutdown(std::net::Shutdown::Write);
                                            return;
                                        }
                                        Ok(n) => {
                                            // The flags are read again after
                                            // the read: bytes that arrive
                                            // after a cut (or stall) was set
                                            // must not pass, or a test's
                                            // "cut, then write" races the
                                            // 100 ms read timeout.
                                            while stall3.load(Ordering::SeqCst)
                                                && !cut3.load(Ordering::SeqCst)
                                            {
                                                std::thread::sleep(Duration::from_millis(50));
                                            }
                                            if cut3.load(Ordering::SeqCst) {
                                                let _ = from.shutdown(std::net::Shutdown::Both);
                                                let _ = to.shutdown(std::net::Shutdown::Both);
                                                return;
                                            }
                                            if to.write_all(&buf[..n]).is_err() {
                                                return;
                                            }
                                        }
                                        Err(e)
                                            if e.kind() == std::io::ErrorKind::WouldBlock
                                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                                        Err(_) => return,
                                    }
                                }
                            });
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Proxy {
            port,
            cut,
            stall,
            stop,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Proxy {
    /// Drops the link's connections and refuses new ones.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}
