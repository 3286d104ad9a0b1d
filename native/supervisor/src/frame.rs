//! Framing of the channel: `u32 BE length | u8 type | payload`, length counting type + payload.

use serde_json::Value;
use std::io::{self, Read, Write};

pub const JSON: u8 = 1;
pub const DATA: u8 = 2;
pub const STDOUT: u8 = 3;
pub const STDERR: u8 = 4;
pub const EOF: u8 = 5;

/// Largest `length` accepted: 1 MiB of payload plus the type byte.
pub const MAX_LEN: usize = (1 << 20) + 1;
/// Size of the chunks this side sends (DATA, STDOUT, STDERR).
pub const CHUNK: usize = 64 * 1024;

pub enum Frame {
    Json(Value),
    Bytes(u8, Vec<u8>),
    Eof,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One frame, or None at a clean end of stream (on a frame boundary).
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_be_bytes(head) as usize;
    if len == 0 || len > MAX_LEN {
        return Err(bad(format!(
            "frame length {len} out of range 1..={MAX_LEN}"
        )));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let ty = body[0];
    body.remove(0);
    match ty {
        JSON => {
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| bad(format!("malformed JSON frame: {e}")))?;
            if !v.is_object() {
                return Err(bad("JSON frame is not an object".into()));
            }
            Ok(Some(Frame::Json(v)))
        }
        DATA | STDOUT | STDERR => Ok(Some(Frame::Bytes(ty, body))),
        EOF => Ok(Some(Frame::Eof)),
        _ => Err(bad(format!("unknown frame type {ty}"))),
    }
}

/// Writes one frame with a single write call, so concurrent writers (behind a lock) and the
/// peer's reader always see whole frames.
pub fn write_frame(w: &mut impl Write, ty: u8, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(5 + payload.len());
    buf.extend_from_slice(&((payload.len() + 1) as u32).to_be_bytes());
    buf.push(ty);
    buf.extend_from_slice(payload);
    w.write_all(&buf)
}

pub fn write_json(w: &mut impl Write, v: &Value) -> io::Result<()> {
    write_frame(w, JSON, v.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Cursor;

    #[test]
    fn round_trip_every_type() {
        let mut buf = Vec::new();
        write_json(&mut buf, &json!({"id": 1, "op": "ps"})).unwrap();
        write_frame(&mut buf, STDOUT, b"hi").unwrap();
        write_frame(&mut buf, EOF, b"").unwrap();
        assert_eq!(&buf[..5], &[0, 0, 0, 19, JSON]);
        let mut r = Cursor::new(buf);
        match read_frame(&mut r).unwrap() {
            Some(Frame::Json(v)) => assert_eq!(v["op"], "ps"),
            _ => panic!("want JSON"),
        }
        match read_frame(&mut r).unwrap() {
            Some(Frame::Bytes(STDOUT, b)) => assert_eq!(b, b"hi"),
            _ => panic!("want STDOUT"),
        }
        assert!(matches!(read_frame(&mut r).unwrap(), Some(Frame::Eof)));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn refuses_oversize_unknown_and_malformed() {
        let mut big = ((MAX_LEN + 1) as u32).to_be_bytes().to_vec();
        big.push(DATA);
        assert!(read_frame(&mut Cursor::new(big)).is_err());
        assert!(read_frame(&mut Cursor::new(vec![0, 0, 0, 0])).is_err());
        assert!(read_frame(&mut Cursor::new(vec![0, 0, 0, 1, 9])).is_err());
        assert!(read_frame(&mut Cursor::new(vec![0, 0, 0, 2, JSON, b'['])).is_err());
        assert!(read_frame(&mut Cursor::new(vec![0, 0, 0, 3, JSON, b'[', b']'])).is_err());
    }

    #[test]
    fn truncated_frame_is_an_error_not_an_end() {
        assert!(read_frame(&mut Cursor::new(vec![0, 0])).is_err());
        assert!(read_frame(&mut Cursor::new(vec![0, 0, 0, 5, DATA, 1])).is_err());
    }

    #[test]
    fn max_length_is_accepted() {
        let mut buf = Vec::new();
        write_frame(&mut buf, DATA, &vec![7u8; MAX_LEN - 1]).unwrap();
        assert!(matches!(
            read_frame(&mut Cursor::new(buf)).unwrap(),
            Some(Frame::Bytes(DATA, _))
        ));
    }
}
