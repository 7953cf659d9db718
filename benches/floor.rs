//! The kernel's price of a write: what one write(2) of N bytes to a loopback TCP socket
//! costs the writing thread (its on-CPU time from /proc/thread-self/schedstat, kernel
//! included), while another thread drains the other end. The write path cannot go below
//! this per write, so per delivery the floor is this divided by the ticks a write
//! carries. `cargo bench --bench floor` (about 10 s).
//!
//! `cargo bench --bench floor -- --round` is the latency floor of the efficiency shape: a
//! publisher thread stamps the time every 1 ms and sends the stamp over a loopback
//! connection to a writer thread, which writes one buffer carrying it to each of 50
//! loopback connections (what the server's I/O thread does once per publish round at
//! 500k/s); a single-threaded tokio runtime reads them, one task per connection (as the
//! load generator's `frames` reader does), recording arrival minus stamp. No server and no
//! HTTP/2: what is left is the kernel, the scheduler and the machine. `--json` prints a
//! report shaped like `tickerd-bench --json`, so `ab.sh` can run it beside the servers.

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
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--round-reader") {
        round::reader_main(&args);
        return;
    }
    if args.iter().any(|a| a == "--round") {
        round::main(&args);
        return;
    }
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

mod round {
    //! The round's fan-out: `--round [--seconds S] [--conns N] [--bytes B]
    //! [--ticks-per-write T] [--no-publisher] [--json]` (`--no-publisher`: the writer keeps
    //! the 1 ms clock itself, without the publisher's hop). Defaults: 10 s after a 2 s warm-up, 50
    //! connections, 900 bytes (what a write carries at 500k/s: `ss -ti` on the server's
    //! connections read 911 bytes per data segment, 10.8 deliveries), 10.8 ticks per write
    //! (only to express the writer's CPU per delivery). `--uring`: the writer queues a
    //! round's writes on io_uring (tokio-uring), and they reach the kernel in one
    //! submission when its runtime parks, instead of one write(2) each. `--writer-cpu N`:
    //! the writer thread alone moves to CPU N (with `taskset`, as it starts), so that under
    //! `taskset -c M` the readers' wake-ups cross CPUs, as when a server has a core of its
    //! own: the kernel's price of the fan-out in that placement. `--reader-process`: the
    //! readers run in a process of their own (this binary again, `--round-reader`), as the
    //! load generator reads a server from another process, rather than on a thread beside
    //! the writer.

    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        sync::{Arc, Mutex},
        time::{Duration, Instant},
    };

    use hdrhistogram::Histogram;
    use tickerd::clock::now_unix_nanos;
    use tokio::io::AsyncReadExt;

    fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
            })
            .unwrap_or(default)
    }

    /// This thread's involuntary context switches (preemptions).
    fn preemptions() -> u64 {
        std::fs::read_to_string("/proc/thread-self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    struct Writer {
        rounds: u64,
        cpu_ns: u64,
        preemptions: u64,
        /// Wall time of each measured round's writes, in microseconds.
        pass_us: Histogram<u64>,
    }

    /// A 1 ms round clock: `warmup`, then `measured`.
    struct Clock {
        next: Instant,
        measure_from: Instant,
        end: Instant,
    }

    impl Clock {
        fn new(warmup: Duration, measured: Duration) -> Clock {
            let start = Instant::now();
            Clock {
                next: start,
                measure_from: start + warmup,
                end: start + warmup + measured,
            }
        }

        /// Sleeps until the next round and stamps it: the time (Unix ns), or -1 in the
        /// warm-up; None once the clock has run out.
        fn tick(&mut self) -> Option<i64> {
            self.next += Duration::from_millis(1);
            let now = Instant::now();
            if now >= self.end {
                return None;
            }
            if self.next > now {
                std::thread::sleep(self.next - now);
            }
            Some(if Instant::now() >= self.measure_from {
                now_unix_nanos()
            } else {
                -1
            })
        }
    }

    /// Where the writer's rounds come from.
    enum Rounds {
        /// Its own clock.
        Own(Clock),
        /// A publisher thread's stamps, 8 bytes each, read from this connection (the
        /// server's side of the load generator's Publish call); it ends at end of stream.
        Relayed(TcpStream),
    }

    impl Rounds {
        fn next(&mut self) -> Option<i64> {
            match self {
                Rounds::Own(clock) => clock.tick(),
                Rounds::Relayed(socket) => {
                    let mut stamp = [0u8; 8];
                    socket.read_exact(&mut stamp).ok()?;
                    Some(i64::from_le_bytes(stamp))
                }
            }
        }
    }

    /// The writer's bookkeeping: from the first measured round, its CPU, preemptions and
    /// each round's wall time.
    struct Meter {
        payload: Vec<u8>,
        from: Option<(u64, u64)>,
        rounds: u64,
        pass_us: Histogram<u64>,
    }

    impl Meter {
        fn new(bytes: usize) -> Meter {
            Meter {
                payload: vec![0x5au8; bytes.max(8)],
                from: None,
                rounds: 0,
                pass_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
            }
        }

        /// A round begins: the payload carries its stamp.
        fn begin(&mut self, stamp: i64) -> Instant {
            if self.from.is_none() && stamp > 0 {
                self.from = Some((super::thread_cpu_ns(), preemptions()));
            }
            self.payload[..8].copy_from_slice(&stamp.to_le_bytes());
            Instant::now()
        }

        fn end(&mut self, began: Instant) {
            if self.from.is_some() {
                self.rounds += 1;
                let _ = self
                    .pass_us
                    .record(began.elapsed().as_micros().max(1) as u64);
            }
        }

        fn finish(self) -> Writer {
            let (cpu, switches) = self.from.unwrap_or((super::thread_cpu_ns(), preemptions()));
            Writer {
                rounds: self.rounds,
                cpu_ns: super::thread_cpu_ns() - cpu,
                preemptions: preemptions() - switches,
                pass_us: self.pass_us,
            }
        }
    }

    /// Moves the calling thread to `cpu` with util-linux's `taskset`, by its thread id
    /// (`/proc/thread-self` names it), so the bench needs no affinity call of its own.
    fn pin_this_thread(cpu: usize) -> Result<(), String> {
        let link = std::fs::read_link("/proc/thread-self")
            .map_err(|e| format!("/proc/thread-self: {e}"))?;
        let tid = link
            .file_name()
            .and_then(|t| t.to_str())
            .ok_or_else(|| format!("no thread id in {link:?}"))?
            .to_string();
        let status = std::process::Command::new("taskset")
            .args(["-pc", &cpu.to_string(), &tid])
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("taskset (util-linux): {e}"))?;
        if !status.success() {
            return Err(format!("taskset -pc {cpu} {tid}: {status}"));
        }
        Ok(())
    }

    /// Writes one `bytes` buffer carrying the round's stamp to every socket, each round.
    fn write_rounds(mut sockets: Vec<TcpStream>, bytes: usize, mut rounds: Rounds) -> Writer {
        let mut meter = Meter::new(bytes);
        while let Some(stamp) = rounds.next() {
            let began = meter.begin(stamp);
            for socket in &mut sockets {
                socket.write_all(&meter.payload).expect("write");
            }
            meter.end(began);
        }
        meter.finish()
    }

    /// `write_rounds` through io_uring: a round's writes are queued as the futures are first
    /// polled and go to the kernel together when tokio-uring's runtime parks.
    fn write_rounds_uring(sockets: Vec<TcpStream>, bytes: usize, mut rounds: Rounds) -> Writer {
        tokio_uring::start(async move {
            let sockets: Vec<_> = sockets
                .into_iter()
                .map(tokio_uring::net::TcpStream::from_std)
                .collect();
            let mut meter = Meter::new(bytes);
            while let Some(stamp) = rounds.next() {
                let began = meter.begin(stamp);
                let round = bytes::Bytes::copy_from_slice(&meter.payload);
                let writes = sockets.iter().map(|s| s.write_all(round.clone()));
                for (result, _) in futures_util::future::join_all(writes).await {
                    result.expect("write");
                }
                meter.end(began);
            }
            meter.finish()
        })
    }

    /// Where the round's records are read: on this process's main thread, or by a child.
    enum Readers {
        Here(Vec<TcpStream>),
        Process(std::process::Child),
    }

    /// What the readers saw: the measured records and their latency quantiles (µs).
    struct Seen {
        records: u64,
        quantiles: [u64; 4],
        max: u64,
    }

    /// The quantiles `Seen` keeps: p50, p90, p99, p99.9.
    const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

    impl Seen {
        fn of(latency: &Histogram<u64>) -> Seen {
            Seen {
                records: latency.len(),
                quantiles: QUANTILES.map(|q| latency.value_at_quantile(q)),
                max: latency.max(),
            }
        }

        /// One line of numbers, for a reader process to hand its figures to the writer's.
        fn line(&self) -> String {
            let q = self.quantiles.map(|v| v.to_string()).join(" ");
            format!("{} {q} {}", self.records, self.max)
        }

        fn parse(line: &str) -> Option<Seen> {
            let v: Vec<u64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?;
            match v[..] {
                [records, a, b, c, d, max] => Some(Seen {
                    records,
                    quantiles: [a, b, c, d],
                    max,
                }),
                _ => None,
            }
        }

        fn q(&self, i: usize) -> u64 {
            self.quantiles[i]
        }
    }

    /// Reads every socket on one single-threaded runtime, one task each, until the writer
    /// closes them.
    fn read_all(readers: Vec<TcpStream>, bytes: usize) -> Seen {
        let latency = Arc::new(Mutex::new(
            Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let tasks: Vec<_> = readers
                .into_iter()
                .map(|s| {
                    s.set_nonblocking(true).expect("nonblocking");
                    let s = tokio::net::TcpStream::from_std(s).expect("register");
                    tokio::spawn(read_records(s, bytes, latency.clone()))
                })
                .collect();
            for task in tasks {
                task.await.expect("reader");
            }
        });
        let latency = latency.lock().unwrap_or_else(|e| e.into_inner());
        Seen::of(&latency)
    }

    /// `--round-reader ADDR [--conns N] [--bytes B]`: `--reader-process`'s readers.
    /// Connects N sockets to the writer's listener, reads them to the end and prints
    /// `Seen::line`.
    pub fn reader_main(args: &[String]) {
        let addr: String = flag(args, "--round-reader", String::new());
        let conns: usize = flag(args, "--conns", 50);
        let bytes: usize = flag(args, "--bytes", 900);
        let readers: Vec<_> = (0..conns)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect();
        println!("{}", read_all(readers, bytes).line());
    }

    /// Reads whole `bytes` records until the writer closes, recording arrival minus stamp
    /// for the measured ones.
    async fn read_records(
        mut socket: tokio::net::TcpStream,
        bytes: usize,
        latency: Arc<Mutex<Histogram<u64>>>,
    ) {
        let bytes = bytes.max(8);
        let mut buf = vec![0u8; 64 * 1024];
        // Position inside the current record, and its stamp's bytes so far.
        let (mut at, mut stamp) = (0usize, [0u8; 8]);
        while let Ok(n) = socket.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let now = now_unix_nanos();
            let mut latency = latency.lock().unwrap_or_else(|e| e.into_inner());
            for &b in &buf[..n] {
                if at < 8 {
                    stamp[at] = b;
                }
                at += 1;
                if at == bytes {
                    at = 0;
                    let sent = i64::from_le_bytes(stamp);
                    if sent > 0 {
                        let _ = latency.record(((now - sent) / 1000).max(1) as u64);
                    }
                }
            }
        }
    }

    pub fn main(args: &[String]) {
        let seconds: f64 = flag(args, "--seconds", 10.0);
        let conns: usize = flag(args, "--conns", 50);
        let bytes: usize = flag(args, "--bytes", 900);
        let ticks_per_write: f64 = flag(args, "--ticks-per-write", 10.8);
        let json = args.iter().any(|a| a == "--json");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut writers = Vec::with_capacity(conns);
        let readers = if args.iter().any(|a| a == "--reader-process") {
            let exe = std::env::current_exe().expect("this binary");
            let child = std::process::Command::new(exe)
                .args(["--round-reader", &addr.to_string()])
                .args(["--conns", &conns.to_string(), "--bytes", &bytes.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("the reader process");
            // The child connects exactly `conns` sockets before the publisher's below.
            for _ in 0..conns {
                let (socket, _) = listener.accept().expect("accept");
                socket.set_nodelay(true).expect("nodelay");
                writers.push(socket);
            }
            Readers::Process(child)
        } else {
            let mut readers = Vec::with_capacity(conns);
            for _ in 0..conns {
                let socket = TcpStream::connect(addr).expect("connect");
                socket.set_nodelay(true).expect("nodelay");
                writers.push(socket);
                readers.push(listener.accept().expect("accept").0);
            }
            Readers::Here(readers)
        };
        let clock = Clock::new(Duration::from_secs(2), Duration::from_secs_f64(seconds));
        let publisher_hop = !args.iter().any(|a| a == "--no-publisher");
        let (rounds, publisher) = if !publisher_hop {
            (Rounds::Own(clock), None)
        } else {
            let publishing = TcpStream::connect(addr).expect("connect");
            publishing.set_nodelay(true).expect("nodelay");
            let (relayed, _) = listener.accept().expect("accept");
            let publisher = std::thread::spawn(move || {
                let (mut clock, mut socket) = (clock, publishing);
                while let Some(stamp) = clock.tick() {
                    socket.write_all(&stamp.to_le_bytes()).expect("publish");
                }
            });
            (Rounds::Relayed(relayed), Some(publisher))
        };
        let uring = args.iter().any(|a| a == "--uring");
        let writer_cpu: Option<usize> = args
            .iter()
            .any(|a| a == "--writer-cpu")
            .then(|| flag(args, "--writer-cpu", 0));
        let writer = std::thread::spawn(move || {
            if let Some(cpu) = writer_cpu {
                if let Err(e) = pin_this_thread(cpu) {
                    eprintln!("floor: --writer-cpu {cpu}: {e}");
                    std::process::exit(2);
                }
            }
            if uring {
                write_rounds_uring(writers, bytes, rounds)
            } else {
                write_rounds(writers, bytes, rounds)
            }
        });
        let seen = match readers {
            Readers::Here(readers) => read_all(readers, bytes),
            Readers::Process(child) => {
                let out = child.wait_with_output().expect("the reader process");
                Seen::parse(&String::from_utf8_lossy(&out.stdout)).expect("the readers' figures")
            }
        };
        let writer = writer.join().expect("writer");
        if let Some(publisher) = publisher {
            publisher.join().expect("publisher");
        }
        let writes = (writer.rounds * conns as u64).max(1) as f64;
        let cpu_per_write_us = writer.cpu_ns as f64 / writes / 1000.0;
        let expected = writer.rounds * conns as u64;
        if json {
            println!(
                "{{\"floor\": {{\"conns\": {conns}, \"bytes\": {bytes}, \"rounds\": {}, \
                 \"writer_cpu_us_per_write\": {cpu_per_write_us:.3}, \"pass_us\": {{\"p50\": {}, \
                 \"p99\": {}}}}}, \"steps\": [{{\"seconds\": {seconds}, \"expected\": {expected}, \
                 \"delivered\": {}, \"delivery_ratio\": {}, \"latency_us\": {{\"p50\": {}, \
                 \"p90\": {}, \"p99\": {}, \"p999\": {}, \"max\": {}}}, \
                 \"server_cpu_us_per_delivery\": {:.4}, \"server_preemptions_per_sec\": {:.1}}}]}}",
                writer.rounds,
                writer.pass_us.value_at_quantile(0.5),
                writer.pass_us.value_at_quantile(0.99),
                seen.records,
                seen.records as f64 / expected.max(1) as f64,
                seen.q(0),
                seen.q(1),
                seen.q(2),
                seen.q(3),
                seen.max,
                cpu_per_write_us / ticks_per_write,
                writer.preemptions as f64 / seconds,
            );
        } else {
            println!(
                "round fan-out, {conns} loopback connections x {bytes} B every 1 ms ({}), {seconds} s",
                if publisher_hop { "stamped by a publisher thread" } else { "no publisher" }
            );
            if uring {
                println!("  writes queued on io_uring, one submission per round");
            }
            println!(
                "  latency us: p50 {} p90 {} p99 {} p99.9 {} max {} ({} of {expected} records)",
                seen.q(0),
                seen.q(1),
                seen.q(2),
                seen.q(3),
                seen.max,
                seen.records
            );
            println!(
                "  writer: {cpu_per_write_us:.2} us CPU per write ({:.3} per delivery at {ticks_per_write} \
                 ticks a write), a round's writes take p50 {} p99 {} us, {:.0} preemptions/s",
                cpu_per_write_us / ticks_per_write,
                writer.pass_us.value_at_quantile(0.5),
                writer.pass_us.value_at_quantile(0.99),
                writer.preemptions as f64 / seconds,
            );
        }
    }
}
