//! The listener's limits: silent connections are closed, and the connection cap makes a new
//! client wait rather than the node fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::{model, serve_in, tempdir, SMOLLM2};

#[test]
fn silent_connections_are_closed_and_the_capped_listener_keeps_serving() {
    let smollm2 = model(SMOLLM2);
    let node = serve_in(
        &tempdir("limits"),
        &["--model", smollm2.to_str().unwrap(), "--connections-max", "4", "--header-read-timeout-ms", "700", "--body-read-timeout-ms", "700"],
        &[],
    );
    let addr = node.base.trim_start_matches("http://").to_string();
    // Four clients take every connection: two never finish their headers, two send nothing.
    let mut silent: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).unwrap();
            if i % 2 == 0 {
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            }
            s
        })
        .collect();
    // A fifth waits for a connection to free up, then is served.
    let started = Instant::now();
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    let r = client.get(format!("{}/health", node.base)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(started.elapsed() < Duration::from_secs(10), "served after {:?}", started.elapsed());
    // The silent ones were closed by the node.
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let closed = s.read_to_end(&mut rest);
        assert!(closed.is_ok(), "a silent connection was left open: {closed:?}");
    }
    // A body that stalls is refused with a 408, in OpenAI's error shape.
    let mut slow = TcpStream::connect(&addr).unwrap();
    let key = node.user_key();
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":");
    slow.write_all(head.as_bytes()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("\"code\":\"request_timeout\""), "{answer}");
    // An idle keep-alive connection is closed too: its next request's headers never come.
    let mut idle = TcpStream::connect(&addr).unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut answer = Vec::new();
    idle.read_to_end(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
}
