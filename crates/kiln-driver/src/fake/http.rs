//! Just enough HTTP/1.1 for the fake's servers: request heads, bodies skipped by
//! `Content-Length`, keep-alive.

use std::io::{self, BufRead, Read, Write};

/// The parts of a request the fake looks at.
#[derive(Debug)]
pub(super) struct Request {
    pub method: String,
    pub path: String,
    pub keep_alive: bool,
}

/// Longest request head the fake accepts.
const MAX_HEAD: usize = 16 * 1024;

/// Reads one request; `None` at a clean end of the connection.
pub(super) fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    // Tolerate blank lines before a request (RFC 9112 §2.2).
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a request line, found {:?}", line.trim_end()),
        ));
    };
    let (method, path) = (method.to_owned(), path.to_owned());
    let mut keep_alive = version == "HTTP/1.1";
    let mut content_length = 0u64;
    let mut head_len = line.len();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        head_len += n;
        if n == 0 || head_len > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "expected the end of the request head",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value.parse().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidData, "expected a content length")
            })?;
        } else if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    io::copy(&mut reader.take(content_length), &mut io::sink())?;
    Ok(Some(Request {
        method,
        path,
        keep_alive,
    }))
}

/// Writes a plain-text response.
pub(super) fn write_response(
    writer: &mut impl Write,
    status: u16,
    body: &str,
    instance: &str,
    keep_alive: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        writer,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         X-Instance: {instance}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pipelined_requests_and_skips_bodies() {
        let raw = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
                   POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
                   GET /c HTTP/1.0\r\n\r\n";
        let mut reader = io::BufReader::new(raw.as_bytes());
        let a = read_request(&mut reader).expect("a").expect("some a");
        assert_eq!(
            (a.method.as_str(), a.path.as_str(), a.keep_alive),
            ("GET", "/a", true)
        );
        let b = read_request(&mut reader).expect("b").expect("some b");
        assert_eq!((b.method.as_str(), b.path.as_str()), ("POST", "/b"));
        let c = read_request(&mut reader).expect("c").expect("some c");
        assert_eq!((c.path.as_str(), c.keep_alive), ("/c", false));
        assert!(read_request(&mut reader).expect("end").is_none());
    }

    #[test]
    fn rejects_garbage() {
        let mut reader = io::BufReader::new("nonsense\r\n\r\n".as_bytes());
        assert!(read_request(&mut reader).is_err());
    }
}
