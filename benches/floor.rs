//! The kernel's price of a write: what one write(2) of N bytes to a loopback TCP socket
//! costs the writing thread (its on-CPU time from /proc/thread-self/schedstat, kernel
//! included), while another thread drains the other end. The write path cannot go below
//! this per write, so per delivery the floor is this divided by the ticks a write
//! carries. `cargo bench --bench floor` (about 10 s).

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Instant,
};

/// The calling thread's on-CPU time in nanoseconds (user and kernel).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Writes `count` buffers of `size` bytes; returns (writer CPU ns per write, wall ns).
fn measure(size: usize, count: usize) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reader = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = socket.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
    });
    let mut socket = TcpStream::connect(addr).expect("connect");
    socket.set_nodelay(true).expect("nodelay");
    let payload = vec![0x5au8; size];
    // Warm the connection up (window growth, page cache).
    for _ in 0..1000 {
        socket.write_all(&payload).expect("write");
    }
    let (cpu, wall) = (thread_cpu_ns(), Instant::now());
    for _ in 0..count {
        socket.write_all(&payload).expect("write");
    }
    let cpu = thread_cpu_ns() - cpu;
    let wall = wall.elapsed().as_nanos() as f64;
    drop(socket);
    reader.join().expect("reader");
    (cpu as f64 / count as f64, wall / count as f64)
}

fn main() {
    println!("write(2) to loopback TCP, TCP_NODELAY, a reader thread draining the other end");
    println!(
        "{:>8} {:>14} {:>12} {:>20}",
        "bytes", "CPU us/write", "wall us", "ns/byte (CPU)"
    );
    // A first pass warms the allocator, the socket code and the CPU's frequency up.
    let _ = measure(300, 100_000);
    for size in [64usize, 300, 1500, 4096, 16384] {
        let count = if size >= 4096 { 50_000 } else { 200_000 };
        let (cpu, wall) = measure(size, count);
        println!(
            "{size:>8} {:>14.2} {:>12.2} {:>20.3}",
            cpu / 1000.0,
            wall / 1000.0,
            cpu / size as f64
        );
    }
}
