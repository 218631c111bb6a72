//! Measuring what a lab's network does between two namespaces: round-trip times (ping),
//! TCP throughput (iperf3) and one-way loss (UDP datagrams counted at the receiver). Used by
//! the lab's tests and the benchmarks: the emulation is measured, not assumed.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::error::{LabError, Result};
use crate::lab::Lab;
use crate::netns::Netns;
use crate::process::LabProcess;

/// Round-trip times in milliseconds of `count` pings from `from` to `to`, `interval` apart
/// (lost ones are missing).
pub fn ping_rtts(from: &Netns, to: Ipv4Addr, count: u32, interval: Duration) -> Result<Vec<f64>> {
    let out = from
        .command("busybox")
        .args([
            "ping",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", interval.as_secs_f64()),
            "-W",
            "2",
            &to.to_string(),
        ])
        .output()
        .map_err(|e| LabError::Spawn {
            command: "busybox ping".into(),
            source: e,
        })?;
    Ok(parse_ping(&String::from_utf8_lossy(&out.stdout)))
}

/// The `time=X ms` values of ping's output.
pub fn parse_ping(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse::<f64>().ok())
        .collect()
}

/// Mean and standard deviation.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// TCP throughput in bits per second from `client` to an iperf3 server started in `server`
/// at `addr`, over `seconds` after omitting the first `omit` (slow start).
pub fn iperf3(
    lab: &Lab,
    server: &Netns,
    client: &Netns,
    addr: Ipv4Addr,
    seconds: u32,
    omit: u32,
) -> Result<f64> {
    let port = 5201u16;
    let name = format!("iperf3-{}", server.name());
    let p = lab.spawn(
        server,
        &name,
        &[
            "iperf3".into(),
            "-s".into(),
            "-B".into(),
            addr.to_string(),
            "-p".into(),
            port.to_string(),
        ],
        &[],
    )?;
    let result = (|| {
        wait_listening(server, port, &p)?;
        let out = client
            .command("iperf3")
            .args([
                "-c",
                &addr.to_string(),
                "-p",
                &port.to_string(),
                "-t",
                &seconds.to_string(),
                "-O",
                &omit.to_string(),
                "-J",
            ])
            .output()
            .map_err(|e| LabError::Spawn {
                command: "iperf3 -c".into(),
                source: e,
            })?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            LabError::Setup(format!(
                "iperf3 printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| LabError::Setup(format!("iperf3 measured nothing: {}", v["error"])))
    })();
    let _ = p.stop(Duration::from_secs(2));
    result
}

fn wait_listening(ns: &Netns, port: u16, p: &LabProcess) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = ns.run(&["ss", "-Hltn", &format!("sport = :{port}")])?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        if p.pid().is_none() || start.elapsed() > Duration::from_secs(10) {
            return Err(LabError::Setup(format!(
                "iperf3 server did not listen on port {port}:\n{}",
                p.log_tail(5)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One-way datagram delivery: `count` UDP datagrams from `from` to `to_addr` in `to`, sent
/// `gap` apart; returns how many arrived (the receiver waits `linger` after the last).
pub fn udp_delivered(
    from: &Netns,
    to: &Netns,
    to_addr: Ipv4Addr,
    count: u32,
    gap: Duration,
    linger: Duration,
) -> Result<u32> {
    let bind = SocketAddr::from((to_addr, 0));
    let rx = to
        .enter(move || UdpSocket::bind(bind))?
        .map_err(|e| LabError::Setup(format!("bind {bind}: {e}")))?;
    let dest = rx
        .local_addr()
        .map_err(|e| LabError::Setup(format!("udp receiver: {e}")))?;
    let tx = from
        .enter(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))?
        .map_err(|e| LabError::Setup(format!("udp sender: {e}")))?;
    let marker = rand::random::<u64>().to_be_bytes();
    let receiver = std::thread::spawn(move || {
        let mut got = 0u32;
        let mut buf = [0u8; 64];
        let _ = rx.set_read_timeout(Some(linger));
        while let Ok(n) = rx.recv(&mut buf) {
            if n >= 8 && buf[..8] == marker {
                got += 1;
            }
        }
        got
    });
    for i in 0..count {
        let mut msg = marker.to_vec();
        msg.extend_from_slice(&i.to_be_bytes());
        tx.send_to(&msg, dest)
            .map_err(|e| LabError::Setup(format!("send to {dest}: {e}")))?;
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    receiver
        .join()
        .map_err(|_| LabError::Setup("udp receiver panicked".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_yields_its_times() {
        let out = "PING 10.2.1.29 (10.2.1.29): 56 data bytes\n\
                   64 bytes from 10.2.1.29: seq=0 ttl=63 time=80.412 ms\n\
                   64 bytes from 10.2.1.29: seq=2 ttl=63 time=79.9 ms\n\n\
                   --- 10.2.1.29 ping statistics ---\n\
                   3 packets transmitted, 2 packets received, 33% packet loss\n\
                   round-trip min/avg/max = 79.900/80.156/80.412 ms\n";
        assert_eq!(parse_ping(out), vec![80.412, 79.9]);
        let (m, sd) = mean_sd(&[1.0, 3.0]);
        assert_eq!((m, sd), (2.0, 1.0));
    }
}
